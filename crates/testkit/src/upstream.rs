//! A scripted HTTP upstream on a free 127.0.0.1 port: it answers each
//! request as the test's script says (a status with headers, a dropped
//! connection, a slow answer) and records what it received. The runner's
//! and the proxy's tests play vendors with it.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::time::Instant;

/// A value shared between the test and the upstream's tasks.
pub type Shared<T> = Arc<std::sync::Mutex<T>>;

/// What the scripted upstream does with the n-th request (from 1) to a path.
#[derive(Debug, Clone)]
pub enum Answer {
    Status(u16, Vec<(&'static str, &'static str)>, &'static str),
    /// Close the connection without answering.
    Drop,
    /// Answer 200 after this long.
    Slow(Duration),
    /// A status, headers and body made for this request.
    Text(u16, Vec<(String, String)>, String),
    /// The answer, after this long.
    After(Duration, Box<Answer>),
}

#[derive(Debug, Clone)]
pub struct Seen {
    pub path: String,
    pub at: Instant,
    pub idempotency_key: String,
    pub authorization: Option<String>,
    /// Every header, lower-case names.
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
    pub method: String,
    /// The path and query as received.
    pub target: String,
}

type Script = Arc<dyn Fn(&Seen, usize) -> Answer + Send + Sync>;

#[derive(Debug)]
pub struct Scripted {
    pub addr: SocketAddr,
    pub seen: Shared<Vec<Seen>>,
    /// Connections accepted so far.
    pub connections: Arc<std::sync::atomic::AtomicUsize>,
}

impl Scripted {
    /// How many requests came to paths under `prefix` so far.
    pub fn seen_under(&self, prefix: &str) -> usize {
        let seen = self.seen.lock().expect("lock");
        seen.iter().filter(|s| s.path.starts_with(prefix)).count()
    }

    /// The requests to `path` so far.
    pub fn seen(&self, path: &str) -> Vec<Seen> {
        self.seen
            .lock()
            .expect("lock")
            .iter()
            .filter(|s| s.path == path)
            .cloned()
            .collect()
    }
}

/// An upstream on a free 127.0.0.1 port that answers the n-th request
/// (from 1) to a path as `script` says, and records every request.
pub async fn scripted(script: impl Fn(&str, usize) -> Answer + Send + Sync + 'static) -> Scripted {
    scripted_with(Arc::new(move |seen: &Seen, n| script(&seen.path, n)), None).await
}

/// `scripted`, with the whole request (its headers, body) given to the
/// script; `n` still counts the requests to its path.
pub async fn scripted_seen(
    script: impl Fn(&Seen, usize) -> Answer + Send + Sync + 'static,
) -> Scripted {
    scripted_with(Arc::new(script), None).await
}

/// `scripted` over TLS, with a certificate for 127.0.0.1 and localhost
/// from a fresh test CA (its PEM file is the second value).
pub async fn scripted_tls(
    script: impl Fn(&str, usize) -> Answer + Send + Sync + 'static,
) -> (Scripted, crate::tls::TestCa) {
    let ca = crate::tls::TestCa::new();
    let script: Script = Arc::new(move |seen: &Seen, n| script(&seen.path, n));
    let up = scripted_with(script, Some(ca.acceptor())).await;
    (up, ca)
}

async fn scripted_with(script: Script, tls: Option<tokio_rustls::TlsAcceptor>) -> Scripted {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let seen: Shared<Vec<Seen>> = Default::default();
    let counts: Shared<HashMap<String, usize>> = Default::default();
    let log = seen.clone();
    let connections = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let accepted = connections.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            accepted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let (log, counts, script) = (log.clone(), counts.clone(), script.clone());
            let tls = tls.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                    let (log, counts, script) = (log.clone(), counts.clone(), script.clone());
                    async move {
                        let path = req.uri().path().to_string();
                        let header = |name: &str| {
                            req.headers()
                                .get(name)
                                .and_then(|v| v.to_str().ok())
                                .map(str::to_owned)
                        };
                        let headers = req
                            .headers()
                            .iter()
                            .map(|(k, v)| {
                                (
                                    k.as_str().to_string(),
                                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                                )
                            })
                            .collect();
                        let method = req.method().to_string();
                        let target = req
                            .uri()
                            .path_and_query()
                            .map_or_else(String::new, |p| p.to_string());
                        let idempotency_key = header("idempotency-key").unwrap_or_default();
                        let authorization = header("authorization");
                        let n = {
                            let mut counts = counts.lock().expect("lock");
                            let n = counts.entry(path.clone()).or_insert(0);
                            *n += 1;
                            *n
                        };
                        let body = req
                            .into_body()
                            .collect()
                            .await
                            .map(|b| b.to_bytes())
                            .unwrap_or_default();
                        let seen = Seen {
                            path: path.clone(),
                            at: Instant::now(),
                            idempotency_key,
                            authorization,
                            headers,
                            body,
                            method,
                            target,
                        };
                        let mut answer = script(&seen, n);
                        log.lock().expect("lock").push(seen);
                        while let Answer::After(delay, then) = answer {
                            tokio::time::sleep(delay).await;
                            answer = *then;
                        }
                        match answer {
                            Answer::Status(status, headers, body) => {
                                Ok(response(status, headers.into_iter(), body.into()))
                            }
                            Answer::Text(status, headers, body) => {
                                Ok(response(status, headers.into_iter(), body.into()))
                            }
                            // (an After was waited out above)
                            Answer::Drop | Answer::After(..) => Err("dropped on purpose"),
                            Answer::Slow(d) => {
                                tokio::time::sleep(d).await;
                                Ok(Response::new(Full::new(Bytes::from("slow ok"))))
                            }
                        }
                    }
                });
                match tls {
                    Some(acceptor) => {
                        if let Ok(stream) = acceptor.accept(stream).await {
                            let _ = http1::Builder::new()
                                .serve_connection(TokioIo::new(stream), service)
                                .await;
                        }
                    }
                    None => {
                        let _ = http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    }
                }
            });
        }
    });
    Scripted {
        addr,
        seen,
        connections,
    }
}

fn response<K: AsRef<str>, V: AsRef<str>>(
    status: u16,
    headers: impl Iterator<Item = (K, V)>,
    body: Bytes,
) -> Response<Full<Bytes>> {
    let mut r = Response::builder().status(status);
    for (k, v) in headers {
        r = r.header(k.as_ref(), v.as_ref());
    }
    r.body(Full::new(body)).expect("response")
}

/// A 200 with a small JSON body.
pub fn ok() -> Answer {
    Answer::Status(200, vec![], "{\"ok\":true}")
}
