//! The comply face's commands: `run`, `plan` and `dlq`.

use anyhow::{bail, Context, Result};
use std::fs::File;
use std::io::{self, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;
use tollgate_core::policy::RedisSettings;
use tollgate_core::Clock;
use tollgate_egress::fleet::{FleetOptions, Queue};
use tollgate_egress::state::{DeadLetter, Pending};
use tollgate_egress::{human, Options, ProgressMode, Routed, State, Summary, UpstreamsConfig};
use tollgate_store::TokioClock;

/// The state directory of a runner on its own, when none is given.
const DEFAULT_STATE: &str = ".tollgate";
/// The fleet queue, when none is given.
const DEFAULT_QUEUE: &str = "default";

/// Where the jobs come from: a JSONL file, or records cut by a bulk template.
#[derive(clap::Args, Debug)]
pub struct JobArgs {
    /// Jobs, one JSON object per line (see docs/runner.md).
    #[arg(long, conflicts_with = "records")]
    pub jobs: Option<PathBuf>,
    /// Records, one JSON value per line, sent in chunks by --bulk.
    #[arg(long, requires = "bulk")]
    pub records: Option<PathBuf>,
    /// The [[upstream.bulk]] template that turns records into calls.
    #[arg(long, requires = "records")]
    pub bulk: Option<String>,
}

/// `run`'s fleet-mode flags (a config with `[store] kind = "redis"`).
#[derive(clap::Args, Debug)]
pub struct FleetArgs {
    /// Fleet mode: the job queue in Redis; runners given the same queue
    /// share one job set (default "default").
    #[arg(long)]
    pub queue: Option<String>,
    /// Fleet mode: how long a runner holds a job without renewing its lease;
    /// a runner that dies leaves its jobs to the others after this long.
    #[arg(long, default_value = "30s")]
    pub lease: String,
}

/// Where a run's jobs, results and dead letters are: a state directory, or
/// the queue in Redis of a fleet config.
#[derive(clap::Args, Debug)]
pub struct StoreArgs {
    /// A fleet config ([store] kind = "redis"): read its queue in Redis.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// The fleet queue (with --config; default "default").
    #[arg(long)]
    pub queue: Option<String>,
    /// The state directory of a runner on its own (default .tollgate).
    #[arg(long)]
    pub state: Option<PathBuf>,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum Progress {
    /// A bar on a terminal, a line every 500 jobs otherwise.
    Auto,
    /// A line every 500 jobs.
    Lines,
    /// Only the summary.
    Quiet,
}

pub fn load_config(path: &Path) -> Result<UpstreamsConfig> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read config {}", path.display()))?;
    tollgate_egress::parse_config(&text, &tollgate_profiles::Bundled, &|name| {
        std::env::var(name).ok()
    })
    .with_context(|| path.display().to_string())
}

/// `tollgate check` on a runner's config: everything `run` checks, except
/// that an unset `${VAR}` (a token) is reported, not an error.
pub fn check(path: &Path, text: &str) -> Result<()> {
    let missing = std::cell::RefCell::new(Vec::new());
    let config = tollgate_egress::parse_config(text, &tollgate_profiles::Bundled, &|name| {
        std::env::var(name).ok().or_else(|| {
            missing.borrow_mut().push(name.to_string());
            Some(String::new())
        })
    })
    .with_context(|| path.display().to_string())?;
    println!(
        "{}: ok, {} upstream(s)",
        path.display(),
        config.upstreams.len()
    );
    for u in &config.upstreams {
        let limits: Vec<_> = u
            .policy
            .limits
            .iter()
            .map(|l| format!("{} ({})", l.name, l.algorithm.name()))
            .collect();
        let bulk: Vec<_> = u.bulk.iter().map(|b| b.name.as_str()).collect();
        println!(
            "  {} at {}: limits {}{}",
            u.name,
            u.base_url,
            limits.join(", "),
            if bulk.is_empty() {
                String::new()
            } else {
                format!("; bulk {}", bulk.join(", "))
            }
        );
    }
    for u in &config.upstreams {
        let kept: Vec<String> = u
            .reserve
            .iter()
            .zip(&u.policy.limits)
            .filter(|(share, _)| **share > 0.0)
            .map(|(share, l)| format!("{}% of {}", share * 100.0, l.name))
            .collect();
        if !kept.is_empty() {
            println!("  {}: reserve for live calls: {}", u.name, kept.join(", "));
        }
        for b in &u.budgets {
            println!(
                "  {}: budget of workflow {}: {}% of {} (limit {}){}",
                u.name,
                b.workflow,
                b.share * 100.0,
                b.of,
                u.policy.limits[b.limit].name,
                if b.borrow {
                    ", borrows what others leave idle"
                } else {
                    ""
                }
            );
        }
    }
    for w in &config.workflows {
        if let Some(s) = &w.schedule {
            const DAYS: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];
            let days: Vec<&str> = DAYS
                .iter()
                .zip(s.days)
                .filter(|(_, on)| *on)
                .map(|(d, _)| *d)
                .collect();
            println!(
                "  workflow {}: queued work goes {:02}:{:02}-{:02}:{:02} {} on {}",
                w.name,
                s.start / 60,
                s.start % 60,
                s.end / 60,
                s.end % 60,
                s.timezone.iana_name().unwrap_or("UTC"),
                days.join(", ")
            );
        }
    }
    // [history], [alerts] and [[alert]], as every face reads them (a
    // webhook's unset url_env is reported like a token's).
    let watch = tollgate_watch::settings::WatchSettings::parse(text, &|name| {
        std::env::var(name).ok().or_else(|| {
            missing.borrow_mut().push(name.to_string());
            Some("https://unset.invalid/".to_string())
        })
    })
    .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    println!(
        "  alerts: {}; {} webhook(s)",
        watch
            .rules
            .iter()
            .map(|r| r.name.as_str())
            .collect::<Vec<_>>()
            .join(", "),
        watch.webhooks.len()
    );
    if text.contains("[proxy") {
        // What `tollgate proxy` reads besides: [proxy] and its clients.
        let proxy = tollgate_proxy::ProxySettings::parse(text, &|name| {
            std::env::var(name).ok().or_else(|| {
                missing.borrow_mut().push(name.to_string());
                Some(format!("unset {name}"))
            })
        })
        .with_context(|| path.display().to_string())?;
        println!(
            "  proxy on {} (admin {}), requests wait up to {}, {} client(s)",
            proxy.listen,
            proxy
                .admin_listen
                .map_or("off".to_string(), |a| a.to_string()),
            human(proxy.max_wait),
            proxy.clients.len()
        );
    }
    for name in missing.into_inner() {
        println!("  note: environment variable {name} is not set; `tollgate run` and `tollgate proxy` will need it");
    }
    Ok(())
}

fn read_jobs(args: &JobArgs, config: &UpstreamsConfig) -> Result<Option<Vec<Routed>>> {
    let open = |path: &Path| {
        File::open(path)
            .map(|f| BufReader::with_capacity(1 << 20, f))
            .with_context(|| format!("cannot open {}", path.display()))
    };
    Ok(match (&args.jobs, &args.records, &args.bulk) {
        (Some(path), _, _) => Some(
            tollgate_egress::read_jobs(open(path)?, config)
                .with_context(|| path.display().to_string())?,
        ),
        (None, Some(path), Some(bulk)) => Some(
            tollgate_egress::read_bulk(open(path)?, config, bulk)
                .with_context(|| path.display().to_string())?,
        ),
        _ => None,
    })
}

/// Jobs per intake request of `run --submit`.
const SUBMIT_BATCH: usize = 1000;

/// `tollgate run --submit URL`: check the jobs against the config, then
/// push them to a running coordinator (`tollgate proxy`) in batches; it
/// keeps and sends them. Ids already there are kept as they were, so
/// submitting again after a failure is safe.
pub fn submit(config_path: &Path, jobs: &JobArgs, url: &str) -> Result<ExitCode> {
    let config = load_config(config_path)?;
    let Some(routed) = read_jobs(jobs, &config)? else {
        bail!("--submit sends jobs: give --jobs FILE, or --records FILE --bulk NAME");
    };
    let base = url.trim_end_matches('/');
    if !(base.starts_with("http://") || base.starts_with("https://")) {
        bail!("--submit '{url}' is not an http(s) URL (the coordinator's listener, e.g. http://127.0.0.1:7070)");
    }
    let endpoint = format!("{base}/_tollgate/jobs");
    let token = std::env::var("TOLLGATE_TOKEN")
        .ok()
        .filter(|t| !t.is_empty());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let client = reqwest::Client::builder().no_proxy().build()?;
    let (mut queued, mut already) = (0u64, 0u64);
    for (n, batch) in routed.chunks(SUBMIT_BATCH).enumerate() {
        let lines: String = batch.iter().map(|r| r.job.to_line() + "\n").collect();
        let mut request = client
            .post(&endpoint)
            .header("content-type", "application/x-ndjson")
            .body(lines);
        if let Some(token) = &token {
            request = request.header("tollgate-token", token);
        }
        let first = n * SUBMIT_BATCH;
        let sent = runtime.block_on(async {
            let response = request.send().await?;
            let status = response.status();
            let body = response.text().await?;
            Ok::<_, reqwest::Error>((status, body))
        });
        let (status, body) = sent.map_err(|e| {
            anyhow::anyhow!(
                "{endpoint}: {e} ({first} of {} job(s) submitted before this; submitting again is safe)",
                routed.len()
            )
        })?;
        let answer: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        if status.as_u16() != 202 {
            let detail = answer["detail"].as_str().unwrap_or(&body);
            bail!(
                "{endpoint} refused jobs {}..{} (status {status}): {detail} ({first} job(s) submitted before them; submitting again is safe)",
                first + 1,
                first + batch.len()
            );
        }
        queued += answer["queued"].as_u64().unwrap_or(0);
        already += answer["already"].as_u64().unwrap_or(0);
    }
    println!(
        "tollgate run: {} job(s) submitted to {base}: {queued} queued{}",
        routed.len(),
        if already > 0 {
            format!(", {already} already there (kept as they were)")
        } else {
            String::new()
        }
    );
    println!("follow one: GET {base}/_tollgate/jobs/ID; results: `tollgate results` on the coordinator's state");
    Ok(ExitCode::SUCCESS)
}

/// `tollgate run`: queue the jobs in the state (or the fleet's queue), then
/// send every pending one.
pub fn run(
    config_path: &Path,
    jobs: &JobArgs,
    state_dir: Option<&Path>,
    fleet: &FleetArgs,
    progress: Progress,
    grace: Duration,
    admin: Option<std::net::SocketAddr>,
) -> Result<ExitCode> {
    let config = load_config(config_path)?;
    if let Some(addr) = admin {
        let token = std::env::var(ADMIN_TOKEN_ENV)
            .ok()
            .filter(|t| !t.is_empty());
        if !addr.ip().is_loopback() && token.is_none() {
            bail!("--admin {addr} is not a loopback address: set {ADMIN_TOKEN_ENV} to an admin token first");
        }
    }
    if let Some(u) = config.upstreams.iter().find(|u| !u.keys.is_empty()) {
        bail!(
            "{}: upstream '{}' has a key pool (keys), which `tollgate proxy` serves; `tollgate run` sends with one key: give it in headers instead",
            config_path.display(),
            u.name
        );
    }
    let routed = read_jobs(jobs, &config)?;
    if let Some(job) = routed.iter().flatten().find(|r| r.job.callback.is_some()) {
        bail!(
            "job '{}' has a callback, which a coordinator delivers: push these jobs to `tollgate proxy` with --submit URL",
            job.job.id
        );
    }
    if let Some(settings) = config.redis() {
        if let Some(dir) = state_dir {
            bail!(
                "--state {} is for a runner on its own; {} has [store] kind = \"redis\", so the jobs live in Redis (use --queue NAME to keep job sets apart)",
                dir.display(),
                config_path.display()
            );
        }
        let queue = queue_name(fleet.queue.as_deref())?;
        let lease = parse_duration(&fleet.lease, "--lease")?;
        let settings = settings.clone();
        let prepare = match routed {
            Some(routed) => Prepare::Import(routed),
            None => Prepare::Nothing,
        };
        return run_fleet(
            &config,
            config_path,
            &settings,
            &queue,
            prepare,
            lease,
            progress,
            grace,
            admin,
        );
    }
    if fleet.queue.is_some() {
        bail!(
            "--queue is for fleet mode: {} has no [store] kind = \"redis\"",
            config_path.display()
        );
    }
    let state_dir = state_dir.unwrap_or(Path::new(DEFAULT_STATE));
    let mut state = State::open(state_dir)?;
    let pending = match routed {
        Some(routed) => {
            let (added, already, pending) = state.import_pending(routed, &config)?;
            eprintln!(
                "tollgate run: {added} job(s) queued in {}{}",
                state_dir.display(),
                if already > 0 {
                    format!(" ({already} already there, resumed as they were)")
                } else {
                    String::new()
                }
            );
            pending
        }
        None => state.pending()?,
    };
    execute(
        &config,
        &state,
        pending,
        config_path,
        progress,
        grace,
        admin,
    )
}

fn parse_duration(text: &str, flag: &str) -> Result<Duration> {
    tollgate_core::units::parse_duration(text)
        .map(Duration::from_nanos)
        .map_err(|e| anyhow::anyhow!("{flag} '{text}': {e}"))
}

/// A queue name is part of Redis key names: letters, digits, `-`, `_`, `.`.
fn queue_name(name: Option<&str>) -> Result<String> {
    let name = name.unwrap_or(DEFAULT_QUEUE);
    if name.is_empty()
        || name.len() > 100
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        bail!("--queue '{name}': use 1 to 100 letters, digits, '-', '_' or '.'");
    }
    Ok(name.to_string())
}

/// The admin token of `run --admin`, read as `serve` reads its own.
const ADMIN_TOKEN_ENV: &str = "TOLLGATE_ADMIN_TOKEN";

fn options(progress: Progress, grace: Duration, admin: Option<std::net::SocketAddr>) -> Options {
    Options {
        admin,
        admin_token: std::env::var(ADMIN_TOKEN_ENV)
            .ok()
            .filter(|t| !t.is_empty()),
        progress: match progress {
            Progress::Auto => ProgressMode::Auto,
            Progress::Lines => ProgressMode::Lines,
            Progress::Quiet => ProgressMode::Quiet,
        },
        grace,
        ..Options::default()
    }
}

/// The config's `[history]`, `[alerts]` and `[[alert]]`.
fn watch_settings(config_path: &Path) -> Result<tollgate_watch::settings::WatchSettings> {
    let text = std::fs::read_to_string(config_path)
        .with_context(|| format!("cannot read {}", config_path.display()))?;
    tollgate_watch::settings::WatchSettings::parse(&text, &|v| std::env::var(v).ok())
        .map_err(|e| anyhow::anyhow!("{}: {e}", config_path.display()))
}

/// What a fleet run does with the queue before it works it.
enum Prepare {
    Import(Vec<Routed>),
    /// `dlq retry`: these dead letters (all when empty) are queued again.
    Requeue(Vec<String>),
    Nothing,
}

/// Fleet mode: prepare the queue, then work it with the other runners and
/// print this runner's summary and the queue's.
#[allow(clippy::too_many_arguments)]
fn run_fleet(
    config: &UpstreamsConfig,
    config_path: &Path,
    settings: &RedisSettings,
    name: &str,
    prepare: Prepare,
    lease: Duration,
    progress: Progress,
    grace: Duration,
    admin: Option<std::net::SocketAddr>,
) -> Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let summary: Summary = runtime.block_on(async {
        let queue = Queue::connect(settings, name).await?;
        match prepare {
            Prepare::Import(routed) => {
                let (added, already) = queue.import(&routed, config).await?;
                eprintln!(
                    "tollgate run: {added} job(s) queued in queue '{name}' at {}{}",
                    queue.url(),
                    if already > 0 {
                        format!(" ({already} already there, left as they were)")
                    } else {
                        String::new()
                    }
                );
            }
            Prepare::Requeue(ids) => {
                let (requeued, unknown) = queue.requeue_dead(&ids).await?;
                say_requeued(requeued.len(), &unknown);
            }
            Prepare::Nothing => {}
        }
        let summary = tollgate_egress::fleet::run(
            config,
            &queue,
            TokioClock::system(),
            Options {
                watch: watch_settings(config_path)?,
                ..options(progress, grace, admin)
            },
            FleetOptions { lease },
            crate::shutdown_signal(),
        )
        .await?;
        anyhow::Ok(summary)
    })?;
    println!("tollgate run: {}", summary.describe());
    let args = format!(
        "--config {}{}",
        config_path.display(),
        if name == DEFAULT_QUEUE {
            String::new()
        } else {
            format!(" --queue {name}")
        }
    );
    println!("results: tollgate results {args}");
    let totals = summary.fleet.clone().unwrap_or_default();
    if summary.interrupted {
        println!(
            "stopped; {} job(s) of the queue are not finished: other runners go on with them, or resume with: tollgate run {args}",
            totals.pending
        );
        return Ok(ExitCode::from(130));
    }
    if totals.dead > 0 {
        println!(
            "{} dead letter(s): tollgate dlq list {args}; re-run them with tollgate dlq retry --all {args}",
            totals.dead
        );
        return Ok(ExitCode::from(2));
    }
    Ok(ExitCode::SUCCESS)
}

/// Send every pending job of the state and print the summary.
fn execute(
    config: &UpstreamsConfig,
    state: &State,
    pending: Vec<Pending>,
    config_path: &Path,
    progress: Progress,
    grace: Duration,
    admin: Option<std::net::SocketAddr>,
) -> Result<ExitCode> {
    if pending.is_empty() {
        eprintln!("tollgate run: nothing pending in {}", state.dir().display());
    }
    let mut options = options(progress, grace, admin);
    options.watch = watch_settings(config_path)?;
    options.state_dir = Some(state.dir().to_path_buf());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let summary = runtime.block_on(tollgate_egress::run_pending(
        config,
        state,
        pending,
        TokioClock::system(),
        options,
        crate::shutdown_signal(),
    ))?;
    println!("tollgate run: {}", summary.describe());
    println!("results: {}", state.results_path().display());
    // (stopped, but every job finished within the grace: a run like any other)
    if summary.interrupted && summary.pending > 0 {
        println!(
            "stopped with {} job(s) pending; resume with: tollgate run --config {} --state {}",
            summary.pending,
            config_path.display(),
            state.dir().display()
        );
        return Ok(ExitCode::from(130));
    }
    let dead = state.counts()?.dead;
    if dead > 0 {
        println!(
            "{dead} dead letter(s): tollgate dlq list --state {0}; re-run them with tollgate dlq retry --all --config {1} --state {0}",
            state.dir().display(),
            config_path.display()
        );
        return Ok(ExitCode::from(2));
    }
    Ok(ExitCode::SUCCESS)
}

/// `tollgate plan`: calls per upstream and the least time the limits allow.
pub fn plan(
    config_path: &Path,
    jobs: &JobArgs,
    latency: Duration,
    state: Option<&Path>,
    report: Option<&Path>,
) -> Result<()> {
    let config = load_config(config_path)?;
    let Some(routed) = read_jobs(jobs, &config)? else {
        bail!("give --jobs FILE, or --records FILE --bulk NAME");
    };
    let paces = match state {
        Some(dir) => open_read_only(dir)?.paces()?,
        None => Default::default(),
    };
    let start = TokioClock::system().now();
    let plans = tollgate_egress::plan::plan_jobs(&config, &routed, start, latency, &paces);
    let mut slowest = Duration::ZERO;
    for p in &plans {
        let e = &p.estimate;
        slowest = slowest.max(e.shortest);
        println!(
            "{}: {} call(s); the limits allow them in {} at the least{}",
            p.upstream,
            e.calls,
            human(e.shortest),
            e.binding
                .as_deref()
                .map(|b| format!(" (binding limit: {b})"))
                .unwrap_or_else(|| " (within the burst: no call waits)".into())
        );
        if let Some(dir) = state {
            match (e.paced_at, p.profile_rate) {
                (Some(rate), Some(profile)) => println!(
                    "  paced at {rate:.1}/s, learnt by an earlier run and kept in {} (the profile allows {profile:.1}/s)",
                    dir.display()
                ),
                _ => println!(
                    "  at the profile's rates: {} keeps no slower pace for it",
                    dir.display()
                ),
            }
        }
        let upstream = config.upstreams.iter().find(|u| u.name == p.upstream);
        for w in &e.workflows {
            println!("  {}", workflow_plan(w, &config, upstream, start));
        }
        if !e.peaks.is_empty() {
            let peaks: Vec<String> = e
                .peaks
                .iter()
                .map(|(limit, peak)| format!("{limit} {:.0}%", peak * 100.0))
                .collect();
            println!("  peak quota use: {}", peaks.join(", "));
        }
        if e.impossible > 0 {
            println!("  {} call(s) can never be admitted (cost above a limit's capacity): they would be dead-lettered", e.impossible);
        }
        for (id, reason) in p.invalid.iter().take(10) {
            println!("  job {id} would be dead-lettered: {reason}");
        }
    }
    println!(
        "total: {} call(s) from {} job(s); {} at the least (upstreams run side by side)",
        plans.iter().map(|p| p.estimate.calls).sum::<u64>(),
        routed.len(),
        human(slowest)
    );
    if let Some(path) = report {
        let seconds = |ns: u64| ns as f64 / 1e9;
        let upstreams: Vec<tollgate_watch::report::PlanUpstream> = plans
            .iter()
            .map(|p| tollgate_watch::report::PlanUpstream {
                name: p.upstream.clone(),
                calls: p.estimate.calls,
                shortest: p.estimate.shortest.as_secs_f64(),
                binding: p.estimate.binding.clone(),
                peaks: p.estimate.peaks.clone(),
                sends: p
                    .estimate
                    .sends
                    .iter()
                    .map(|(w, at)| (w.clone(), at.iter().map(|t| seconds(*t)).collect()))
                    .collect(),
            })
            .collect();
        let title = jobs_title(jobs);
        let html = tollgate_watch::report::plan(&title, seconds(start) as i64, &upstreams);
        std::fs::write(path, html).with_context(|| format!("cannot write {}", path.display()))?;
        println!("report: {}", path.display());
    }
    Ok(())
}

/// What a job set is called in a report: its file.
fn jobs_title(jobs: &JobArgs) -> String {
    jobs.jobs
        .as_ref()
        .or(jobs.records.as_ref())
        .map(|p| p.display().to_string())
        .unwrap_or_default()
}

/// One workflow's line of `tollgate plan`: when its calls would go, and
/// whether they fit its window and budget.
fn workflow_plan(
    w: &tollgate_egress::plan::WorkflowEstimate,
    config: &UpstreamsConfig,
    upstream: Option<&tollgate_egress::Upstream>,
    start: tollgate_core::Nanos,
) -> String {
    let schedule = config.workflow(&w.name).and_then(|c| c.schedule.as_ref());
    let tz = schedule.map_or(jiff::tz::TimeZone::UTC, |s| s.timezone.clone());
    let at = |ns: u64| {
        jiff::Timestamp::from_nanosecond(i128::from(ns))
            .map(|t| {
                t.to_zoned(tz.clone())
                    .strftime("%Y-%m-%d %H:%M:%S %Z")
                    .to_string()
            })
            .unwrap_or_default()
    };
    let mut line = format!(
        "workflow {}: {} call(s), first {} (in {}), last {}",
        w.name,
        w.calls,
        at(w.first),
        human(std::time::Duration::from_nanos(
            w.first.saturating_sub(start)
        )),
        at(w.last)
    );
    if let Some(s) = schedule {
        let inside =
            s.window_end(w.first).is_some() && s.window_end(w.first) == s.window_end(w.last);
        line += if inside {
            "; fits its window"
        } else {
            "; does NOT fit one window (the rest waits for the next)"
        };
    }
    let budget = upstream.and_then(|u| {
        let b = u.budgets.iter().find(|b| b.workflow == w.name)?;
        Some((b, u.policy.limits[b.limit].params(0).policy().0))
    });
    if let Some((b, quota)) = budget {
        line += &match w.calls <= quota {
            true => format!("; within its budget ({}% of {}: {quota})", b.share * 100.0, b.of),
            false => format!(
                "; over its budget ({}% of {}: {quota}): the rest waits for the budget's next window",
                b.share * 100.0,
                b.of
            ),
        };
    }
    line
}

#[derive(clap::Subcommand, Debug)]
pub enum DlqCommand {
    /// One line per dead letter: id, upstream, attempts, status, reason.
    List {
        #[command(flatten)]
        from: StoreArgs,
    },
    /// A dead letter in full: the request, its reason, the response's start.
    Show {
        id: String,
        #[command(flatten)]
        from: StoreArgs,
    },
    /// Queue dead letters again (fresh attempts) and run them now.
    Retry {
        /// The ids to retry (or --all).
        ids: Vec<String>,
        #[arg(long, conflicts_with = "ids")]
        all: bool,
        #[arg(long)]
        config: PathBuf,
        /// The state directory of a runner on its own (default .tollgate).
        #[arg(long)]
        state: Option<PathBuf>,
        /// The fleet queue (a config with [store] kind = "redis").
        #[arg(long)]
        queue: Option<String>,
        #[arg(long, value_enum, default_value = "auto")]
        progress: Progress,
    },
    /// Write dead letters as job lines (`--jobs` reads them back), each with
    /// a `dead_letter` field saying why.
    Export {
        #[command(flatten)]
        from: StoreArgs,
        /// Write here instead of stdout.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

/// Where `dlq` and `results` read.
enum Where {
    State(PathBuf),
    Fleet {
        settings: RedisSettings,
        queue: String,
    },
}

/// A state directory, or the fleet queue of `--config`. The config's
/// `${VAR}`s need not be set: nothing is sent.
fn locate(from: &StoreArgs) -> Result<Where> {
    let state = || {
        from.state
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE))
    };
    let Some(path) = &from.config else {
        if from.queue.is_some() {
            bail!("--queue needs --config with [store] kind = \"redis\" (the fleet's config)");
        }
        return Ok(Where::State(state()));
    };
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read config {}", path.display()))?;
    let config = tollgate_egress::parse_config(&text, &tollgate_profiles::Bundled, &|name| {
        Some(std::env::var(name).unwrap_or_default())
    })
    .with_context(|| path.display().to_string())?;
    match config.redis() {
        Some(settings) => {
            if let Some(dir) = &from.state {
                bail!(
                    "give --state {} or a fleet --config, not both: {} has [store] kind = \"redis\"",
                    dir.display(),
                    path.display()
                );
            }
            Ok(Where::Fleet {
                settings: settings.clone(),
                queue: queue_name(from.queue.as_deref())?,
            })
        }
        None if from.queue.is_some() => bail!(
            "--queue is for fleet mode: {} has no [store] kind = \"redis\"",
            path.display()
        ),
        None => Ok(Where::State(state())),
    }
}

/// Run `f` on the fleet's queue, on a small runtime of its own.
fn with_queue<T>(
    settings: &RedisSettings,
    name: &str,
    f: impl AsyncFnOnce(&Queue) -> Result<T>,
) -> Result<T> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        let queue = Queue::connect(settings, name).await?;
        f(&queue).await
    })
}

fn state_exists(dir: &Path) -> Result<()> {
    if !dir.join("state.sqlite").exists() {
        bail!("no tollgate state in {} (give --state DIR)", dir.display());
    }
    Ok(())
}

/// Reading never takes the state from a run that owns it.
fn open_read_only(dir: &Path) -> Result<State> {
    state_exists(dir)?;
    Ok(State::open_read_only(dir)?)
}

fn dead_letters(from: &StoreArgs) -> Result<Vec<DeadLetter>> {
    match locate(from)? {
        Where::State(dir) => Ok(open_read_only(&dir)?.dead_letters()?),
        Where::Fleet { settings, queue } => {
            with_queue(&settings, &queue, async |q| Ok(q.dead_letters().await?))
        }
    }
}

pub fn dlq(command: DlqCommand) -> Result<ExitCode> {
    match command {
        DlqCommand::List { from } => {
            let letters = dead_letters(&from)?;
            for d in &letters {
                println!(
                    "{}\t{}\tattempts={}\tstatus={}\t{}",
                    d.id,
                    d.upstream,
                    d.attempts,
                    d.status.map_or("-".into(), |s| s.to_string()),
                    d.reason
                );
            }
            eprintln!("{} dead letter(s)", letters.len());
        }
        DlqCommand::Show { id, from } => {
            let (letter, job_state, place) = match locate(&from)? {
                Where::State(dir) => {
                    let state = open_read_only(&dir)?;
                    (
                        state.dead_letter(&id)?,
                        state.job_state(&id)?,
                        dir.display().to_string(),
                    )
                }
                Where::Fleet { settings, queue } => with_queue(&settings, &queue, async |q| {
                    Ok((
                        q.dead_letter(&id).await?,
                        q.job_state(&id).await?,
                        format!("queue '{}' at {}", q.name(), q.url()),
                    ))
                })?,
            };
            match (letter, job_state) {
                (Some(d), _) => println!("{}", serde_json::to_string_pretty(&d)?),
                (None, Some(s)) => bail!("job '{id}' is not a dead letter (it is {s})"),
                (None, None) => bail!("no job '{id}' in {place}"),
            }
        }
        DlqCommand::Retry {
            ids,
            all,
            config,
            state,
            queue,
            progress,
        } => {
            if ids.is_empty() && !all {
                bail!("name the dead letters to retry, or give --all");
            }
            let runner = load_config(&config)?;
            let grace = Duration::from_secs(10);
            if let Some(settings) = runner.redis() {
                if let Some(dir) = &state {
                    bail!(
                        "give --state {} or a fleet --config, not both: {} has [store] kind = \"redis\"",
                        dir.display(),
                        config.display()
                    );
                }
                let name = queue_name(queue.as_deref())?;
                let settings = settings.clone();
                return run_fleet(
                    &runner,
                    &config,
                    &settings,
                    &name,
                    Prepare::Requeue(ids),
                    FleetOptions::default().lease,
                    progress,
                    grace,
                    None,
                );
            }
            if queue.is_some() {
                bail!(
                    "--queue is for fleet mode: {} has no [store] kind = \"redis\"",
                    config.display()
                );
            }
            let state = state.unwrap_or_else(|| PathBuf::from(DEFAULT_STATE));
            state_exists(&state)?;
            let mut opened = State::open(&state)?;
            let (requeued, unknown) = opened.requeue_dead(&ids)?;
            say_requeued(requeued.len(), &unknown);
            let pending = opened.pending()?;
            return execute(&runner, &opened, pending, &config, progress, grace, None);
        }
        DlqCommand::Export { from, out } => {
            let letters = dead_letters(&from)?;
            let mut output = output(out.as_deref())?;
            for d in &letters {
                writeln!(output, "{}", export_line(d))?;
            }
            output.flush()?;
            eprintln!("{} dead letter(s) exported", letters.len());
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `tollgate results`: every finished job's current result line.
pub fn results(from: &StoreArgs, out: Option<&Path>) -> Result<ExitCode> {
    let lines = match locate(from)? {
        Where::State(dir) => {
            state_exists(&dir)?;
            let path = dir.join("results.jsonl");
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            text.lines().map(str::to_owned).collect::<Vec<_>>()
        }
        Where::Fleet { settings, queue } => {
            with_queue(&settings, &queue, async |q| Ok(q.results().await?))?
        }
    };
    let mut output = output(out)?;
    for line in &lines {
        writeln!(output, "{line}")?;
    }
    output.flush()?;
    eprintln!("{} result(s)", lines.len());
    Ok(ExitCode::SUCCESS)
}

fn output(out: Option<&Path>) -> Result<Box<dyn Write>> {
    Ok(match out {
        Some(path) => Box::new(
            File::create(path).with_context(|| format!("cannot write {}", path.display()))?,
        ),
        None => Box::new(io::stdout().lock()),
    })
}

/// A dead letter as a job line that `--jobs` reads back.
fn export_line(d: &DeadLetter) -> serde_json::Value {
    let mut line = serde_json::json!({
        "id": d.job.id,
        "method": d.job.method,
        "url": d.job.url,
        "priority": d.job.priority,
        "idempotency_key": d.job.idempotency_key,
        "dead_letter": { "reason": d.reason, "status": d.status, "attempts": d.attempts },
    });
    if !d.job.headers.is_empty() {
        line["headers"] = d
            .job
            .headers
            .iter()
            .map(|(k, v)| (k.clone(), serde_json::Value::from(v.clone())))
            .collect::<serde_json::Map<_, _>>()
            .into();
    }
    if let Some(w) = &d.job.workflow {
        line["workflow"] = w.clone().into();
    }
    match (&d.job.body, d.job.json) {
        (Some(body), true) => {
            line["body"] = serde_json::from_str(body).unwrap_or_else(|_| body.clone().into());
        }
        (Some(body), false) => line["body_text"] = body.clone().into(),
        (None, _) => {}
    }
    line
}

/// What `tollgate dlq retry` queued again, and the ids that were not dead letters.
fn say_requeued(requeued: usize, unknown: &[String]) {
    if !unknown.is_empty() {
        eprintln!(
            "not dead letters (left as they are): {}",
            unknown.join(", ")
        );
    }
    eprintln!("tollgate dlq: {requeued} dead letter(s) queued again");
}
