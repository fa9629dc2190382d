//! Listeners and lifecycle: accept loops for the proxy and admin ports,
//! reload triggers (SIGHUP, file change), periodic upkeep, and graceful
//! shutdown (stop accepting, let held and in-flight requests finish within
//! `shutdown_grace`).

use crate::gateway::Gateway;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tollgate_core::Clock;

/// How often idle keys are swept and unreported checks expired.
const UPKEEP_EVERY: Duration = Duration::from_secs(10);
/// A `/v1/check` not reported within this is settled without latency.
const CHECK_TTL: Duration = Duration::from_secs(600);
/// Largest request head (line and headers) read; past it the client gets 431.
pub(crate) const MAX_HEAD_BYTES: usize = 64 * 1024;

/// The listeners a gateway serves on.
#[derive(Debug)]
pub struct Listeners {
    pub proxy: TcpListener,
    pub admin: Option<TcpListener>,
}

impl Listeners {
    /// Bind the addresses of the gateway's current config.
    pub async fn bind(gateway: &Gateway) -> std::io::Result<Listeners> {
        let settings = &gateway.current().settings;
        let bind = |addr: SocketAddr| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")))
        };
        let proxy = bind(settings.listen).await?;
        let admin = match settings.admin_listen {
            Some(a) => Some(bind(a).await?),
            None => None,
        };
        Ok(Listeners { proxy, admin })
    }
}

/// Serve until `shutdown` completes, then drain.
pub async fn serve(
    gateway: Arc<Gateway>,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
) {
    let graceful = GracefulShutdown::new();
    let upkeep = tokio::spawn(upkeep(gateway.clone()));
    let reloads = tokio::spawn(reload_triggers(gateway.clone()));
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            () = &mut shutdown => break,
            a = listeners.proxy.accept() => a.map(|(s, p)| (s, p, false)),
            a = accept_admin(listeners.admin.as_ref()) => a.map(|(s, p)| (s, p, true)),
        };
        let (stream, peer, admin) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors and the like: back off, keep serving.
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let io = TokioIo::new(stream);
        let gw = gateway.clone();
        let mut builder = http1::Builder::new();
        builder
            .max_buf_size(MAX_HEAD_BYTES)
            .timer(TokioTimer::new())
            .header_read_timeout(Duration::from_secs(30));
        if admin {
            let conn = builder.serve_connection(io, service_fn(move |req| gw.clone().admin(req)));
            let conn = graceful.watch(conn);
            tokio::spawn(async move {
                let _ = conn.await;
            });
        } else {
            let conn =
                builder.serve_connection(io, service_fn(move |req| gw.clone().proxy(req, peer)));
            let conn = graceful.watch(conn);
            tokio::spawn(async move {
                let _ = conn.await;
            });
        }
    }
    drop(listeners);
    upkeep.abort();
    reloads.abort();
    let grace = gateway.current().settings.shutdown_grace;
    tracing::info!(
        "shutting down: no new connections; waiting up to {grace:?} for requests in flight"
    );
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("requests still in flight after {grace:?}; closing them");
    }
}

async fn accept_admin(
    admin: Option<&TcpListener>,
) -> std::io::Result<(tokio::net::TcpStream, SocketAddr)> {
    match admin {
        Some(l) => l.accept().await,
        None => std::future::pending().await,
    }
}

/// Sweep idle keys and expire unreported checks, now and then.
async fn upkeep(gateway: Arc<Gateway>) {
    let mut every = tokio::time::interval(UPKEEP_EVERY);
    every.tick().await;
    loop {
        every.tick().await;
        let gw = gateway.clone();
        // Sweeping locks shards one at a time; keep it off the request threads.
        let _ = tokio::task::spawn_blocking(move || {
            let now = gw.clock.now();
            gw.current().engine.sweep(now);
            gw.expire_checks(CHECK_TTL);
        })
        .await;
    }
}

/// Reload on SIGHUP and when the config file changes.
async fn reload_triggers(gateway: Arc<Gateway>) {
    #[cfg(unix)]
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    loop {
        let interval = gateway.current().settings.watch_interval;
        #[cfg(unix)]
        let hangup = async {
            match hup.as_mut() {
                Some(h) => {
                    h.recv().await;
                }
                None => std::future::pending().await,
            }
        };
        #[cfg(not(unix))]
        let hangup = std::future::pending::<()>();
        tokio::select! {
            () = hangup => {
                tracing::info!("SIGHUP: reloading the config");
                let _ = gateway.reload().await;
            }
            () = tokio::time::sleep(interval) => {
                let _ = gateway.reload_if_changed().await;
            }
        }
    }
}
