//! The client half of `bench/redis.sh`: decisions against one redis-server,
//! through tollgate's Redis store or through an envoy-ratelimit-style
//! fixed-window client, with the same `redis` crate and the same pool of
//! multiplexed connections, so only the protocol differs.
//!
//! ```text
//! redis-bench tollgate --url URL --policy FILE [--decisions N | --secs S] [options]
//! redis-bench envoy    --url URL --quota Q --window SECS [--decisions N | --secs S] [options]
//! redis-bench engine   --url URL --policy FILE [--decisions N | --secs S] [options]
//! options: --concurrency C (64)  --tenants T (1000)  --pool P (4)  --warmup SECS (1)  --handshake
//! ```
//!
//! `tollgate` plans each request (`Policy::plan` over a tenant header) and
//! decides it with `RedisStore::decide`: one FCALL of `decide.lua` over
//! every limit of the request, at Redis's clock (decisions queued while the
//! store's connections were busy share a call; `calls=` in the result line
//! counts the calls). `envoy` does what envoy's
//! ratelimit service does for one descriptor on its Redis fixed-window cache
//! (src/redis/fixed_cache_impl.go): one pipeline per request of
//! `INCRBY key hits` + `EXPIRE key unit_seconds`, the key being
//! `domain_descriptorkey_value_windowstart` at the client's clock, and the
//! returned count compared to the limit afterwards. `engine` decides as the
//! gateway does, through `Engine::decide_async` (so a limit's `lease` applies:
//! `bench/lease.sh`); it does not count calls (`calls=-`).
//!
//! With `--handshake` the client connects and warms up, prints `ready`, and
//! waits for a line on stdin before the measured run (the script resets
//! Redis's statistics in between), so the figures it reads cover the
//! measured decisions only. The result is one `key=value` line on stdout.

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use std::io::BufRead as _;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tollgate_core::{parse, Attrs, Item, Nanos, NoProfiles, Policy, Verdict};
use tollgate_store::redis::{RedisStore, TimeSource};
use tollgate_store::Engine;

#[derive(Debug, Clone)]
struct Opts {
    client: String,
    url: String,
    policy: Option<String>,
    quota: u64,
    window: u64,
    decisions: Option<u64>,
    secs: f64,
    concurrency: usize,
    tenants: usize,
    pool: usize,
    warmup: f64,
    handshake: bool,
}

fn usage(msg: &str) -> ! {
    eprintln!("redis-bench: {msg}");
    eprintln!(
        "usage: redis-bench (tollgate --policy FILE | envoy --quota Q --window SECS) --url URL \
         [--decisions N | --secs S] [--concurrency C] [--tenants T] [--pool P] [--warmup SECS] [--handshake]"
    );
    std::process::exit(2)
}

fn opts() -> Opts {
    let mut args = std::env::args().skip(1);
    let client = args.next().unwrap_or_else(|| usage("which client?"));
    if !["tollgate", "envoy", "engine"].contains(&client.as_str()) {
        usage(&format!("unknown client '{client}'"));
    }
    let mut o = Opts {
        client,
        url: String::new(),
        policy: None,
        quota: 1_000_000_000,
        window: 60,
        decisions: None,
        secs: 5.0,
        concurrency: 64,
        tenants: 1000,
        pool: 4,
        warmup: 1.0,
        handshake: false,
    };
    while let Some(flag) = args.next() {
        if flag == "--handshake" {
            o.handshake = true;
            continue;
        }
        let value = args
            .next()
            .unwrap_or_else(|| usage(&format!("{flag} needs a value")));
        let num = |v: &str| -> f64 {
            v.parse()
                .unwrap_or_else(|_| usage(&format!("{flag}: '{v}' is not a number")))
        };
        match flag.as_str() {
            "--url" => o.url = value,
            "--policy" => o.policy = Some(value),
            "--quota" => o.quota = num(&value) as u64,
            "--window" => o.window = num(&value) as u64,
            "--decisions" => o.decisions = Some(num(&value) as u64),
            "--secs" => o.secs = num(&value),
            "--concurrency" => o.concurrency = (num(&value) as usize).max(1),
            "--tenants" => o.tenants = (num(&value) as usize).max(1),
            "--pool" => o.pool = (num(&value) as usize).max(1),
            "--warmup" => o.warmup = num(&value),
            _ => usage(&format!("unknown option {flag}")),
        }
    }
    if o.url.is_empty() {
        usage("--url is required");
    }
    if o.client != "envoy" && o.policy.is_none() {
        usage("tollgate needs --policy FILE");
    }
    o
}

fn now_nanos() -> Nanos {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as Nanos)
}

/// CPU seconds (user + system) this process has used so far.
fn cpu_secs() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    // Fields after the command name (which is in parentheses): utime is the 14th field overall.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

/// One client: decide the request of tenant `t`; true if admitted.
trait Client: Send + Sync + 'static {
    /// Calls (script calls, or pipelines) sent so far, if counted.
    fn calls(&self) -> Option<u64>;
    fn decide(
        &self,
        t: usize,
        items: &mut Vec<Item>,
    ) -> impl std::future::Future<Output = Result<bool, String>> + Send;
}

struct Tollgate {
    store: RedisStore,
    policy: Policy,
    requests: Vec<Attrs>,
}

impl Client for Tollgate {
    fn calls(&self) -> Option<u64> {
        Some(self.store.calls())
    }
    async fn decide(&self, t: usize, items: &mut Vec<Item>) -> Result<bool, String> {
        self.policy
            .plan(&self.requests[t], items)
            .map_err(|e| e.to_string())?;
        let d = self
            .store
            .decide(&self.policy, items, now_nanos(), true)
            .await
            .map_err(|e| e.to_string())?;
        Ok(matches!(d.verdict, Verdict::Admit { .. }))
    }
}

/// The gateway's way: the engine in fleet mode (leases included).
struct ThroughEngine {
    engine: Engine,
    requests: Vec<Attrs>,
}

impl Client for ThroughEngine {
    fn calls(&self) -> Option<u64> {
        None
    }
    async fn decide(&self, t: usize, items: &mut Vec<Item>) -> Result<bool, String> {
        self.engine
            .policy()
            .plan(&self.requests[t], items)
            .map_err(|e| e.to_string())?;
        let (d, local) = self
            .engine
            .decide_async(items, now_nanos(), true)
            .await
            .map_err(|e| e.to_string())?;
        if local {
            return Err("redis did not answer (decided by the fail mode)".into());
        }
        Ok(matches!(d.verdict, Verdict::Admit { .. }))
    }
}

/// envoy ratelimit's Redis fixed-window cache, for one descriptor per request.
struct Envoy {
    pool: Vec<ConnectionManager>,
    next: AtomicUsize,
    quota: u64,
    window: u64,
    tenants: Vec<String>,
    pipelines: AtomicU64,
}

impl Client for Envoy {
    fn calls(&self) -> Option<u64> {
        Some(self.pipelines.load(Ordering::Relaxed))
    }
    async fn decide(&self, t: usize, _items: &mut Vec<Item>) -> Result<bool, String> {
        let hits: u64 = 1;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let window_start = now / self.window * self.window;
        // domain_key_value_windowstart, as envoy's cache key generator builds it.
        let key = format!("bench_tenant_{}_{}", self.tenants[t], window_start);
        let mut conn =
            self.pool[self.next.fetch_add(1, Ordering::Relaxed) % self.pool.len()].clone();
        self.pipelines.fetch_add(1, Ordering::Relaxed);
        let (after,): (u64,) = redis::pipe()
            .cmd("INCRBY")
            .arg(&key)
            .arg(hits)
            .cmd("EXPIRE")
            .arg(&key)
            .arg(self.window)
            .ignore()
            .query_async(&mut conn)
            .await
            .map_err(|e| e.to_string())?;
        // What envoy reports back: over the limit or not, the remaining quota,
        // and the time until the window resets.
        let over = after > self.quota;
        let remaining = self.quota.saturating_sub(after);
        let reset = window_start + self.window - now;
        std::hint::black_box((remaining, reset));
        Ok(!over)
    }
}

#[derive(Default)]
struct Tally {
    admitted: u64,
    denied: u64,
    errors: u64,
    first_error: Option<String>,
    latencies_us: Vec<u32>,
}

/// Run `concurrency` tasks until `count` decisions are made or `deadline` passes.
async fn drive<C: Client>(
    client: Arc<C>,
    o: &Opts,
    count: Option<u64>,
    secs: f64,
    record: bool,
) -> (Tally, f64) {
    let stop = Arc::new(AtomicBool::new(false));
    let issued = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(secs);
    let mut tasks = Vec::with_capacity(o.concurrency);
    for task in 0..o.concurrency {
        let (client, stop, issued) = (client.clone(), stop.clone(), issued.clone());
        let (tenants, concurrency) = (o.tenants, o.concurrency);
        tasks.push(tokio::spawn(async move {
            let mut tally = Tally::default();
            let mut items = Vec::with_capacity(4);
            let mut j = 0usize;
            loop {
                if let Some(n) = count {
                    if issued.fetch_add(1, Ordering::Relaxed) as u64 >= n {
                        break;
                    }
                } else if stop.load(Ordering::Relaxed) {
                    break;
                }
                let t = (task + j * concurrency) % tenants;
                j += 1;
                let t0 = Instant::now();
                match client.decide(t, &mut items).await {
                    Ok(true) => tally.admitted += 1,
                    Ok(false) => tally.denied += 1,
                    Err(e) => {
                        tally.errors += 1;
                        tally.first_error.get_or_insert(e);
                    }
                }
                if record {
                    tally
                        .latencies_us
                        .push(t0.elapsed().as_micros().min(u32::MAX as u128) as u32);
                }
                if count.is_none() && Instant::now() >= deadline {
                    stop.store(true, Ordering::Relaxed);
                }
            }
            tally
        }));
    }
    let mut total = Tally::default();
    for t in tasks {
        let t = t.await.expect("a decision task panicked");
        total.admitted += t.admitted;
        total.denied += t.denied;
        total.errors += t.errors;
        if total.first_error.is_none() {
            total.first_error = t.first_error;
        }
        total.latencies_us.extend(t.latencies_us);
    }
    (total, started.elapsed().as_secs_f64())
}

async fn connect_pool(url: &str, size: usize) -> Vec<ConnectionManager> {
    let client = redis::Client::open(url).unwrap_or_else(|e| usage(&format!("--url: {e}")));
    // The settings tollgate's store uses with its default timeout (100 ms).
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(1)))
        .set_response_timeout(Some(Duration::from_millis(100)))
        .set_number_of_retries(1)
        .set_max_delay(Duration::from_secs(2));
    let mut pool = Vec::with_capacity(size);
    for _ in 0..size {
        let conn = ConnectionManager::new_with_config(client.clone(), config.clone())
            .await
            .unwrap_or_else(|e| {
                eprintln!("redis-bench: cannot connect to {url}: {e}");
                std::process::exit(1)
            });
        pool.push(conn);
    }
    pool
}

async fn run<C: Client>(client: Arc<C>, o: &Opts) {
    // Warm up: connections open, the script loaded, the keys created.
    let (warm, _) = drive(client.clone(), o, None, o.warmup.max(0.05), false).await;
    if warm.errors > 0 {
        eprintln!(
            "redis-bench: warm-up failed: {} errors, first: {}",
            warm.errors,
            warm.first_error.unwrap_or_default()
        );
        std::process::exit(1);
    }
    if o.handshake {
        println!("ready");
        let mut line = String::new();
        let _ = std::io::stdin().lock().read_line(&mut line);
    }
    let cpu0 = cpu_secs();
    let calls0 = client.calls();
    let (mut tally, secs) = drive(client.clone(), o, o.decisions, o.secs, true).await;
    let cpu = cpu_secs() - cpu0;
    let calls = match (client.calls(), calls0) {
        (Some(after), Some(before)) => (after - before).to_string(),
        _ => "-".into(),
    };
    tally.latencies_us.sort_unstable();
    let pct = |p: f64| -> u32 {
        let l = &tally.latencies_us;
        if l.is_empty() {
            return 0;
        }
        l[((l.len() as f64 * p).ceil() as usize).clamp(1, l.len()) - 1]
    };
    let n = tally.admitted + tally.denied + tally.errors;
    println!(
        "client={} decisions={} admitted={} denied={} errors={} secs={:.3} rate={:.0} \
         p50_us={} p99_us={} max_us={} cpu_pct={:.0} cpu_us_per_decision={:.2} calls={calls}",
        o.client,
        n,
        tally.admitted,
        tally.denied,
        tally.errors,
        secs,
        n as f64 / secs,
        pct(0.50),
        pct(0.99),
        tally.latencies_us.last().copied().unwrap_or(0),
        100.0 * cpu / secs,
        1e6 * cpu / n.max(1) as f64,
    );
    if let Some(e) = tally.first_error {
        eprintln!("redis-bench: {} errors, first: {e}", tally.errors);
        std::process::exit(1);
    }
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let o = opts();
    let tenants: Vec<String> = (0..o.tenants).map(|i| format!("t{i:06}")).collect();
    if o.client == "envoy" {
        let client = Envoy {
            pool: connect_pool(&o.url, o.pool).await,
            next: AtomicUsize::new(0),
            quota: o.quota,
            window: o.window.max(1),
            tenants,
            pipelines: AtomicU64::new(0),
        };
        return run(Arc::new(client), &o).await;
    }
    let path = o.policy.as_deref().unwrap_or_default();
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| usage(&format!("--policy {path}: {e}")));
    let text = format!(
        "{text}\n[store]\nkind = \"redis\"\nurl = \"{}\"\npool = {}\n",
        o.url, o.pool
    );
    let policy = parse(&text, &NoProfiles).unwrap_or_else(|e| usage(&format!("{path}: {e}")));
    let settings = policy
        .store
        .redis
        .clone()
        .unwrap_or_else(|| usage("no [store] redis settings"));
    let store = RedisStore::new(&settings, &policy, "bench", TimeSource::Server)
        .unwrap_or_else(|e| usage(&e.to_string()));
    if let Err(e) = store.connect().await {
        eprintln!("redis-bench: {e}");
        std::process::exit(1);
    }
    let requests = tenants
        .iter()
        .map(|t| Attrs::new("GET", "/v1/items", &[("x-tenant-id", t)]))
        .collect();
    if o.client == "engine" {
        let engine = Engine::open(policy, "bench").unwrap_or_else(|e| usage(&e.to_string()));
        if let Err(e) = engine.connect().await {
            eprintln!("redis-bench: {e}");
            std::process::exit(1);
        }
        return run(Arc::new(ThroughEngine { engine, requests }), &o).await;
    }
    let client = Tollgate {
        store,
        policy,
        requests,
    };
    run(Arc::new(client), &o).await
}
