//! What the CLI's test binaries share: a real HTTP upstream on 127.0.0.1,
//! a raw HTTP/1.1 client, and small file helpers.

#![allow(dead_code)] // each test binary uses its own part of the harness

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// An upstream on its own runtime: 200 (or 400 to paths under /bad while
/// `failing`), recording each request's arrival and Idempotency-Key (or,
/// for a callback a coordinator delivers, its Tollgate-Job-Id).
pub struct Upstream {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<(Instant, String)>>>,
    /// While true, paths under /bad answer 400.
    pub failing: Arc<AtomicBool>,
    _runtime: tokio::runtime::Runtime,
}

impl Upstream {
    pub fn start() -> Upstream {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let seen: Arc<Mutex<Vec<(Instant, String)>>> = Default::default();
        let failing = Arc::new(AtomicBool::new(true));
        let (log, f) = (seen.clone(), failing.clone());
        runtime.spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (log, f) = (log.clone(), f.clone());
                tokio::spawn(async move {
                    let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                        let (log, f) = (log.clone(), f.clone());
                        async move {
                            let at = Instant::now();
                            let key = ["idempotency-key", "tollgate-job-id"]
                                .iter()
                                .find_map(|name| req.headers().get(*name)?.to_str().ok())
                                .unwrap_or("")
                                .to_string();
                            let bad =
                                req.uri().path().starts_with("/bad") && f.load(Ordering::SeqCst);
                            let _ = req.into_body().collect().await;
                            log.lock().expect("lock").push((at, key));
                            let (status, body) = if bad {
                                (400, "{\"error\":\"invalid stage\"}")
                            } else {
                                (200, "{\"ok\":true}")
                            };
                            Response::builder()
                                .status(status)
                                .body(Full::new(Bytes::from(body)))
                        }
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Upstream {
            addr,
            seen,
            failing,
            _runtime: runtime,
        }
    }

    pub fn arrivals(&self) -> Vec<Instant> {
        let mut at: Vec<Instant> = self
            .seen
            .lock()
            .expect("lock")
            .iter()
            .map(|s| s.0)
            .collect();
        at.sort();
        at
    }

    /// Every key seen (Idempotency-Key or Tollgate-Job-Id), repeats included.
    pub fn keys(&self) -> Vec<String> {
        let seen = self.seen.lock().expect("lock");
        seen.iter().map(|s| s.1.clone()).collect()
    }

    pub fn distinct_keys(&self) -> usize {
        let seen = self.seen.lock().expect("lock");
        let mut keys: Vec<&String> = seen.iter().map(|s| &s.1).collect();
        keys.sort();
        keys.dedup();
        keys.len()
    }
}

impl Upstream {
    /// Requests received, retries included.
    pub fn requests(&self) -> usize {
        self.seen.lock().expect("lock").len()
    }
}

/// Write `text` to `dir/name`; its path as a string.
pub fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write");
    path.to_str().expect("utf8").to_string()
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// One HTTP/1.1 request on a fresh connection: (status, head and body).
pub fn http(addr: &str, method: &str, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
    let mut stream = std::net::TcpStream::connect(addr).expect("connect");
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: 0\r\n"
    );
    for (k, v) in headers {
        request.push_str(&format!("{k}: {v}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).expect("send");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read");
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status line");
    (status, response)
}

/// A running `tollgate serve` and its proxy and admin addresses; killed on drop.
pub struct Serve {
    pub child: std::process::Child,
    pub proxy: String,
    pub admin: String,
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `text` in a file of this test process's own directory.
pub fn config_file(name: &str, text: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("tollgate-serve-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write config");
    path
}

/// `tollgate serve` on `config` with the demo upstream, on ephemeral ports.
pub fn serve_command(config: &Path) -> std::process::Command {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"));
    cmd.args(["serve", "--config", config.to_str().expect("utf8")])
        .args([
            "--demo-upstream",
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    // (its history file, .tollgate/, goes next to the config)
    if let Some(dir) = config.parent() {
        cmd.current_dir(dir);
    }
    cmd
}

/// Start `serve_command(config)` and wait until it serves.
pub fn serve(config: &Path) -> Serve {
    let mut child = serve_command(config).spawn().expect("spawn serve");
    let (proxy, admin) = wait_serving(&mut child);
    Serve {
        child,
        proxy,
        admin,
    }
}

/// Wait until a spawned `tollgate serve` (its stderr piped) serves: its
/// proxy and admin addresses from its log line (host:port, without the
/// scheme). Its log is drained from then on.
pub fn wait_serving(child: &mut std::process::Child) -> (String, String) {
    use std::io::BufRead;
    let mut stderr = std::io::BufReader::new(child.stderr.take().expect("stderr"));
    let mut line = String::new();
    while !line.contains("tollgate serving on") {
        line.clear();
        assert!(
            stderr.read_line(&mut line).expect("log") > 0,
            "serve exited early"
        );
    }
    // Keep draining its log so it never blocks on a full pipe.
    std::thread::spawn(move || for _ in stderr.lines() {});
    let addrs: Vec<String> = line
        .split("://")
        .skip(1)
        .map(|s| s.split([' ', ')']).next().expect("addr").to_string())
        .collect();
    (addrs[0].clone(), addrs[1].clone())
}

/// A `tollgate` process a test started; killed when dropped.
pub struct Running(pub std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Wait until the admin listener at `addr` answers `/healthz` (30 s at most).
pub fn ready(addr: &str) {
    let deadline = Instant::now() + std::time::Duration::from_secs(30);
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(addr).is_ok() && http(addr, "GET", "/healthz", &[]).0 == 200
        {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    panic!("{addr} did not answer /healthz");
}
