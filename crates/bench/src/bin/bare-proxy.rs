//! bench/proxy.sh's floor: the least a reverse proxy built on the same
//! crates as `tollgate proxy` (a hyper HTTP/1.1 server, the comply face's
//! client `tollgate_http::client::UpstreamClient`, a tokio runtime) costs per request, with nothing else: no route,
//! no line, no limits, no headers changed. tollgate's figures are read
//! against it and against nginx.
//!
//!   bare-proxy LISTEN UPSTREAM      # e.g. 127.0.0.1:7071 http://127.0.0.1:8080

use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::time::Duration;
use tollgate_http::client::{Proxies, UpstreamClient};

type Body = http_body_util::combinators::UnsyncBoxBody<bytes::Bytes, hyper::Error>;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(listen), Some(upstream)) = (args.next(), args.next()) else {
        return Err(
            "usage: bare-proxy LISTEN UPSTREAM (e.g. 127.0.0.1:7071 http://127.0.0.1:8080)".into(),
        );
    };
    let upstream: hyper::Uri = upstream.parse()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(&listen).await?;
        let direct = Proxies::builder().build();
        let client: UpstreamClient<Body> =
            UpstreamClient::new(&upstream, None, Duration::from_secs(10), &direct)?;
        loop {
            let (stream, _) = listener.accept().await?;
            let _ = stream.set_nodelay(true);
            let (client, upstream) = (client.clone(), upstream.clone());
            let service = service_fn(move |req: Request<Incoming>| {
                let (client, upstream) = (client.clone(), upstream.clone());
                async move { Ok::<_, Infallible>(relay(&client, &upstream, req).await) }
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service),
            );
        }
    })
}

async fn relay(
    client: &UpstreamClient<Body>,
    upstream: &hyper::Uri,
    req: Request<Incoming>,
) -> Response<Body> {
    let (mut parts, body) = req.into_parts();
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let mut uri = hyper::http::uri::Parts::from(upstream.clone());
    uri.path_and_query = path.parse().ok();
    parts.uri = hyper::Uri::from_parts(uri).unwrap_or_else(|_| upstream.clone());
    match client
        .request(Request::from_parts(parts, body.boxed_unsync()))
        .await
    {
        Ok(response) => response.map(|b| b.boxed_unsync()),
        Err(e) => {
            let mut response = Response::new(
                http_body_util::Empty::new()
                    .map_err(|never| match never {})
                    .boxed_unsync(),
            );
            *response.status_mut() = hyper::StatusCode::BAD_GATEWAY;
            eprintln!("upstream call failed: {e}");
            response
        }
    }
}
