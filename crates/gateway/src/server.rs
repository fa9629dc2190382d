//! Listeners and lifecycle: accept loops for the proxy and admin ports,
//! reload triggers (SIGHUP, file change), periodic upkeep, and graceful
//! shutdown (stop accepting, let held and in-flight requests finish within
//! `shutdown_grace`).

use crate::gateway::Gateway;
use crate::upstream::ClientConnection;
use hyper::service::service_fn;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tollgate_core::Clock;
use tollgate_http::listen::{self, Listeners};
use tollgate_http::Peer;

/// How often idle keys are swept and unreported checks expired.
const UPKEEP_EVERY: Duration = Duration::from_secs(10);
/// A `/v1/check` not reported within this is settled without latency.
const CHECK_TTL: Duration = Duration::from_secs(600);
impl Gateway {
    /// Bind the addresses of the gateway's current config. The proxy socket
    /// is bound with SO_REUSEPORT so that each worker thread can accept on
    /// its own socket of the same address.
    pub async fn listeners(&self) -> std::io::Result<Listeners> {
        let settings = &self.current().settings;
        let mut listeners = Listeners::bind(settings.listen, settings.admin_listen, true).await?;
        if let Some(addr) = settings.rls_listen {
            listeners.rls = Some(listen::bind(addr).await?);
        }
        Ok(listeners)
    }
}

/// Serve until `shutdown` completes, then drain. With more than one worker,
/// the others run on threads of their own, each with a single-threaded
/// runtime and its own socket of the proxy address (thread per core, as nginx
/// runs one process per core: no work stealing, no cross-thread wakeups per
/// request). One worker runs on the calling runtime alone and cannot fail.
/// The calling runtime runs the first worker, the admin listener, reloads
/// and upkeep. Returns when `shutdown` completes and every worker drained.
pub async fn serve_workers(
    gateway: Arc<Gateway>,
    listeners: Listeners,
    workers: usize,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut threads = Vec::new();
    for worker in 1..workers.max(1) {
        let listener = listen::reuseport_listener(listeners.proxy.local_addr()?)?;
        let (gateway, stopped) = (gateway.clone(), stopped.clone());
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        threads.push(
            std::thread::Builder::new()
                .name(format!("tollgate-worker-{worker}"))
                .spawn(move || {
                    runtime.block_on(async move {
                        match TcpListener::from_std(listener) {
                            Ok(l) => accept_loop(gateway, l, None, worker, stopped).await,
                            Err(e) => tracing::error!("worker {worker} cannot listen: {e}"),
                        }
                    })
                })?,
        );
    }
    let rls = listeners.rls.map(|listener| {
        // (no Nagle: an answer written as several frames would wait for
        // the client's delayed ACK, 40 ms)
        let incoming =
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
        let mut stopped = stopped.clone();
        let server = tonic::transport::Server::builder()
            .add_service(crate::rls::Rls::server(gateway.clone()))
            .serve_with_incoming_shutdown(incoming, async move {
                let _ = stopped.wait_for(|stop| *stop).await;
            });
        tokio::spawn(async move {
            if let Err(e) = server.await {
                tracing::error!("the rate limit service (gRPC) stopped: {e}");
            }
        })
    });
    let upkeep = tokio::spawn(upkeep(gateway.clone()));
    let reloads = tokio::spawn(reload_triggers(gateway.clone()));
    let scraping = {
        let scraped = gateway.clone();
        tokio::spawn(gateway.watch.clone().run(move || scraped.metrics_text()))
    };
    let serving = accept_loop(
        gateway.clone(),
        listeners.proxy,
        listeners.admin,
        0,
        stopped,
    );
    let mut serving = std::pin::pin!(serving);
    tokio::select! {
        () = &mut serving => {}
        () = shutdown => {
            let _ = stop.send(true);
            serving.await;
        }
    }
    upkeep.abort();
    reloads.abort();
    scraping.abort();
    if let Some(rls) = rls {
        let _ = rls.await;
    }
    for t in threads {
        let _ = tokio::task::spawn_blocking(move || t.join()).await;
    }
    // Leased limits: what this process's slices did not use goes back to the fleet.
    let generation = gateway.current();
    let returned = generation
        .engine
        .give_back_leases(gateway.clock.now(), true)
        .await;
    if returned > 0 {
        tracing::info!("gave back the unused units of {returned} leased slices");
    }
    // The last figures into the history before the process goes.
    gateway
        .watch
        .tick(tollgate_watch::unix_now(), || gateway.metrics_text());
    Ok(())
}

/// Accept and serve connections until `stopped` turns true, then drain.
async fn accept_loop(
    gateway: Arc<Gateway>,
    proxy: TcpListener,
    admin: Option<TcpListener>,
    worker: usize,
    stopped: tokio::sync::watch::Receiver<bool>,
) {
    let grace = gateway.current().settings.shutdown_grace;
    let gw = gateway.clone();
    // One acceptor per worker; each handshake asks it for the current certificate.
    let acceptor = match gateway.tls.as_ref().map(|certs| certs.acceptor()) {
        Some(Ok(acceptor)) => Some(acceptor),
        Some(Err(e)) => {
            tracing::error!("worker {worker} cannot serve TLS: {e}");
            return;
        }
        None => None,
    };
    listen::accept_loop(
        proxy,
        admin,
        stopped,
        grace,
        worker == 0,
        move |accepted, graceful| {
            let gw = gw.clone();
            if accepted.admin {
                let service = service_fn(move |req| gw.clone().admin(req));
                listen::serve_http1(accepted.stream, service, graceful);
            } else {
                let connection = Arc::new(ClientConnection::new(
                    Peer::new(accepted.peer),
                    gw.upstreams(worker).clone(),
                ));
                let service = service_fn(move |req| gw.clone().proxy(req, connection.clone()));
                match &acceptor {
                    Some(tls) => listen::serve_tls(accepted.stream, tls.clone(), service, graceful),
                    None => listen::serve_any_version(accepted.stream, service, graceful),
                }
            }
        },
    )
    .await;
}

/// Sweep idle keys and expire unreported checks, now and then.
async fn upkeep(gateway: Arc<Gateway>) {
    let mut every = tokio::time::interval(UPKEEP_EVERY);
    every.tick().await;
    loop {
        every.tick().await;
        // Slices of keys that went quiet go back to the fleet's quota.
        let engine = gateway.current().engine.clone();
        engine.give_back_leases(gateway.clock.now(), false).await;
        let gw = gateway.clone();
        // Sweeping locks shards one at a time; keep it off the request threads.
        let _ = tokio::task::spawn_blocking(move || {
            let now = gw.clock.now();
            gw.current().engine.sweep(now);
            gw.expire_checks(CHECK_TTL);
            gw.prune_idle_upstreams();
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
                gateway.reload_certificate_if_changed();
            }
        }
    }
}
