//! The tollgate gateway playing a vendor: it enforces a bundled profile in
//! front of an echo upstream, so a comply-side test meets the vendor's
//! published limits enforced by an engine it does not share.

use crate::upstream::{ok, scripted};
use std::net::SocketAddr;
use std::sync::Arc;
use tollgate_store::TokioClock;

/// The gateway enforcing `profile` in front of an echo upstream; its proxy
/// address and the gateway.
pub async fn gateway(
    profile: &str,
    clock: TokioClock,
) -> (SocketAddr, Arc<tollgate_gateway::Gateway>) {
    let echo = scripted(|_, _| ok()).await;
    let config = format!(
        "profile = \"{profile}\"\n[gateway]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\naccess_log = \"off\"\nupstream = \"http://{}\"\n",
        echo.addr
    );
    let gateway = Arc::new(
        tollgate_gateway::Gateway::new(
            tollgate_gateway::Source::Text(config),
            tollgate_gateway::Overrides::default(),
            Box::new(tollgate_profiles::Bundled),
            clock,
        )
        .expect("gateway config"),
    );
    let listeners = gateway.listeners().await.expect("bind");
    let addr = listeners.proxy.local_addr().expect("addr");
    let serving =
        tollgate_gateway::serve_workers(gateway.clone(), listeners, 1, std::future::pending());
    tokio::spawn(async move {
        let _ = serving.await;
    });
    (addr, gateway)
}
