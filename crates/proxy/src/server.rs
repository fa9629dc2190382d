//! Listeners and lifecycle: the proxy and admin ports, reload on SIGHUP,
//! and a graceful drain on shutdown (requests waiting in line or in flight
//! get `shutdown_grace` to finish).

use crate::call::Downstream;
use crate::state::Proxy;
use hyper::service::service_fn;
use std::future::Future;
use std::sync::Arc;
use tollgate_http::listen::{self, Listeners};
use tollgate_http::Peer;

impl Proxy {
    /// Bind the addresses of the proxy's current config.
    pub async fn listeners(&self) -> std::io::Result<Listeners> {
        let settings = &self.current().settings;
        Listeners::bind(settings.listen, settings.admin_listen, false).await
    }
}

/// Serve until `shutdown` completes, then drain.
pub async fn serve(
    proxy: Arc<Proxy>,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let reloads = tokio::spawn(reload_on_hangup(proxy.clone()));
    let scraping = {
        let scraped = proxy.clone();
        tokio::spawn(proxy.watch.clone().run(move || scraped.metrics_text()))
    };
    proxy.jobs.resume(&proxy);
    let grace = proxy.current().settings.shutdown_grace;
    let served = proxy.clone();
    let serving = listen::accept_loop(
        listeners.proxy,
        listeners.admin,
        stopped,
        grace,
        true,
        move |accepted, graceful| {
            let proxy = served.clone();
            if accepted.admin {
                let service = service_fn(move |req| proxy.clone().admin(req));
                listen::serve_http1(accepted.stream, service, graceful);
            } else {
                let downstream = Arc::new(Downstream {
                    peer: Arc::new(Peer::new(accepted.peer)),
                    tunnel_watcher: parking_lot::Mutex::new(Some(graceful.watcher())),
                });
                let service = service_fn(move |req| proxy.clone().handle(req, downstream.clone()));
                // (a CONNECT takes its connection over for an intercepted tunnel)
                listen::serve_http1_with_upgrades(accepted.stream, service, graceful);
            }
        },
    );
    let mut serving = std::pin::pin!(serving);
    tokio::select! {
        () = &mut serving => {}
        () = shutdown => {
            let _ = stop.send(true);
            serving.await;
        }
    }
    reloads.abort();
    scraping.abort();
    proxy.jobs.close();
    // The last figures into the history before the process goes.
    proxy
        .watch
        .tick(tollgate_watch::unix_now(), || proxy.metrics_text());
    Ok(())
}

/// Reload on SIGHUP (and `POST /v1/reload` on the admin listener).
async fn reload_on_hangup(proxy: Arc<Proxy>) {
    #[cfg(unix)]
    {
        let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        else {
            return;
        };
        while hup.recv().await.is_some() {
            tracing::info!("SIGHUP: reloading the config");
            let _ = proxy.reload().await;
        }
    }
    #[cfg(not(unix))]
    let _ = proxy;
}
