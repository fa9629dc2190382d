//! Test support: a real `redis-server` on a free 127.0.0.1 port, a scripted
//! HTTP upstream (`upstream`), the gateway playing a vendor (`vendor`), and
//! an HTTP proxy (`proxy`).
//!
//! `bash scripts/test.sh` starts one server for the whole run and exports
//! `TOLLGATE_TEST_REDIS` (its URL); tests that only need *a* Redis use it
//! through `redis_url()`, each under its own key prefix. Tests that stop and
//! restart Redis own a private server (`RedisServer::start`), killed when the
//! value drops. Without the variable, `redis_url()` starts a server for the
//! test process (stopped once the process is gone), so `cargo test` alone
//! works wherever `redis-server` is installed.

pub mod proxy;
pub mod tls;
pub mod upstream;
pub mod vendor;

use std::io::{BufRead, BufReader};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// A redis-server child process; killed on drop.
#[derive(Debug)]
pub struct RedisServer {
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
    password: Option<String>,
    /// Append-only file, fsynced on every write: a killed server restarts
    /// with everything it acknowledged.
    persistent: bool,
    /// FUNCTION and FCALL renamed away: a server as Redis 6 was, with
    /// scripts only.
    scripts_only: bool,
}

impl RedisServer {
    /// Start a server on a free port, persisting nothing.
    pub fn start() -> RedisServer {
        Self::start_with(None)
    }

    /// Start a server that requires `password` (AUTH) from every client.
    pub fn start_with(password: Option<&str>) -> RedisServer {
        Self::launch(password, false, false)
    }

    /// Start a server that keeps its data across `kill` + `restart` (AOF,
    /// `appendfsync always`): what a fleet's job queue needs.
    pub fn start_persistent() -> RedisServer {
        Self::launch(None, true, false)
    }

    /// Start a server without Redis Functions (`FUNCTION` and `FCALL`
    /// disabled, as on Redis < 7): clients must fall back to scripts.
    pub fn start_without_functions() -> RedisServer {
        Self::launch(None, false, true)
    }

    fn launch(password: Option<&str>, persistent: bool, scripts_only: bool) -> RedisServer {
        let port = free_port();
        let dir =
            std::env::temp_dir().join(format!("tollgate-redis-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create the redis dir");
        let mut server = RedisServer {
            port,
            dir,
            child: None,
            password: password.map(str::to_owned),
            persistent,
            scripts_only,
        };
        server.restart();
        server
    }

    /// `redis://127.0.0.1:PORT` (no password in it).
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Kill the server at once (SIGKILL): clients see connections drop.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Start it again on the same port: empty, or with its data if persistent.
    pub fn restart(&mut self) {
        self.kill();
        let mut cmd = Command::new(redis_server());
        cmd.args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", ""])
            .args(if self.persistent {
                ["--appendonly", "yes", "--appendfsync", "always"]
            } else {
                ["--appendonly", "no", "--appendfsync", "everysec"]
            })
            .arg("--dir")
            .arg(&self.dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        if let Some(p) = &self.password {
            cmd.args(["--requirepass", p]);
        }
        if self.scripts_only {
            cmd.args([
                "--rename-command",
                "FCALL",
                "",
                "--rename-command",
                "FUNCTION",
                "",
            ]);
        }
        let mut child = cmd.spawn().unwrap_or_else(|e| {
            panic!(
                "cannot start {}: {e} (install redis-server, or run bash scripts/test.sh, which does)",
                redis_server()
            )
        });
        // Drain its log so a full pipe never blocks it.
        if let Some(out) = child.stdout.take() {
            std::thread::spawn(move || for _ in BufReader::new(out).lines() {});
        }
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "redis-server did not start on {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A Redis for tests that do not stop it: the run's shared server
/// (`TOLLGATE_TEST_REDIS`) or, without one, a server private to this process.
pub fn redis_url() -> String {
    if let Ok(url) = std::env::var("TOLLGATE_TEST_REDIS") {
        return url;
    }
    // A static is never dropped, so this server is not killed by `Drop`: a
    // small shell watches this test process and stops the server once the
    // process is gone (statics outliving their process leaked servers).
    static OWN: OnceLock<String> = OnceLock::new();
    OWN.get_or_init(|| {
        let port = free_port();
        let script = format!(
            "{} --port {port} --bind 127.0.0.1 --save '' --appendonly no >/dev/null 2>&1 & r=$!; \
             while kill -0 {} 2>/dev/null; do sleep 0.5; done; kill $r",
            redis_server(),
            std::process::id()
        );
        let mut watcher = Command::new("sh")
            .args(["-c", &script])
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start a redis-server watcher: {e}"));
        std::thread::spawn(move || watcher.wait());
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "{} did not start on {port} (install redis-server, or run bash scripts/test.sh)",
                redis_server()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        format!("redis://127.0.0.1:{port}")
    })
    .clone()
}

/// A key prefix no other test of this run uses.
pub fn unique_prefix(test: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!(
        "t{}-{}-{test}-{}",
        std::process::id(),
        nanos % 1_000_000_000,
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// The redis-server binary: `TOLLGATE_REDIS_SERVER` or the one on PATH.
pub fn redis_server() -> String {
    std::env::var("TOLLGATE_REDIS_SERVER").unwrap_or_else(|_| "redis-server".into())
}

/// A port nothing listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}
