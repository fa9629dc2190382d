//! The `tollgate` binary: parses arguments, loads config, wires the pieces.

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use std::fs::File;
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use tollgate_core::{Nanos, Policy};
use tollgate_store::Engine;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod comply;

/// `tollgate --version`: the release and the commit it was built from.
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("TOLLGATE_COMMIT"),
    ")"
);

#[derive(Parser)]
#[command(
    name = "tollgate",
    version = VERSION,
    about = "One rate-limit engine with two faces: enforce quotas, comply with them."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum ProxyCommand {
    /// The local CA that answers intercepted HTTPS_PROXY tunnels.
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
}

#[derive(Subcommand)]
enum CaCommand {
    /// Create the CA: ca.pem for clients to trust, ca-key.pem (0600).
    Init {
        /// Where to put it (default: the config's [proxy] ca_dir, else .tollgate/proxy-ca).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Read [proxy] ca_dir from this config.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Replace an existing CA (clients that trust it must trust the new one).
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand)]
enum Command {
    /// Validate a config; errors name the line, the limit and the field.
    Check {
        /// The policy file (TOML).
        #[arg(
            required_unless_present = "config_flag",
            conflicts_with = "config_flag"
        )]
        config: Option<PathBuf>,
        /// The same, written as `serve`, `proxy` and `run` take it.
        #[arg(long = "config", id = "config_flag", value_name = "CONFIG")]
        config_flag: Option<PathBuf>,
    },
    /// Replay a trace (JSONL) through the engine on a virtual clock.
    Simulate {
        #[command(flatten)]
        policy: PolicyArgs,
        /// Trace file, one request per line, sorted by `t`; `-` for stdin.
        #[arg(long)]
        trace: PathBuf,
        /// The instant `t = 0` stands for (RFC 3339).
        #[arg(long, default_value = "2026-01-01T00:00:00Z")]
        start: String,
        /// Print admitted / held / denied per limit and key. Decisions are then
        /// only written when --out is given.
        #[arg(long)]
        summary: bool,
        /// Write decisions here instead of stdout.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Draw the replay in an HTML file: admitted, held and denied over
        /// time per limit, the busiest keys, when each quota ran out.
        /// Decisions are then only written when --out is given.
        #[arg(long)]
        report: Option<PathBuf>,
    },
    /// Enforce a config's limits in front of an HTTP API (reverse proxy,
    /// admin listener with metrics, usage, reload and the check API).
    Serve {
        #[command(flatten)]
        policy: PolicyArgs,
        /// Where admitted requests go (overrides `[gateway] upstream`).
        #[arg(long, conflicts_with = "demo_upstream")]
        upstream: Option<String>,
        /// Start a small bundled echo upstream on a free port and proxy to it.
        #[arg(long)]
        demo_upstream: bool,
        /// Proxy listener (overrides `[gateway] listen`; default 127.0.0.1:8080).
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
        /// Admin listener (overrides `[gateway] admin_listen`; default 127.0.0.1:9090).
        #[arg(long)]
        admin: Option<std::net::SocketAddr>,
        /// Access log on stdout: off, text or json (overrides `[gateway] access_log`).
        #[arg(long)]
        access_log: Option<String>,
    },
    /// One throttling layer for live calls to other people's APIs: every
    /// request to an upstream waits for its slot (instead of failing), is
    /// retried when safe, and shares the upstream's quota with all others.
    #[command(args_conflicts_with_subcommands = true)]
    Proxy {
        #[command(subcommand)]
        command: Option<ProxyCommand>,
        /// The config with the [[upstream]] entries (and [proxy]).
        #[arg(long, required = true)]
        config: Option<PathBuf>,
        /// Proxy listener (overrides `[proxy] listen`; default 127.0.0.1:7070).
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
        /// Admin listener (overrides `[proxy] admin_listen`; default 127.0.0.1:9091).
        #[arg(long)]
        admin: Option<std::net::SocketAddr>,
    },
    /// Send jobs through other people's rate limits: at the fastest pace
    /// their limits allow, retried as they say, recorded in --state so a
    /// crash or Ctrl-C resumes, failures dead-lettered.
    Run {
        /// The config with the [[upstream]] entries.
        #[arg(long)]
        config: PathBuf,
        #[command(flatten)]
        jobs: comply::JobArgs,
        /// The state directory (SQLite state, results.jsonl; default
        /// .tollgate). Not with a fleet config ([store] kind = "redis").
        #[arg(long)]
        state: Option<PathBuf>,
        #[command(flatten)]
        fleet: comply::FleetArgs,
        #[arg(long, value_enum, default_value = "auto")]
        progress: comply::Progress,
        /// After Ctrl-C, how long requests in flight may take to finish.
        #[arg(long, default_value = "10s")]
        grace: String,
        /// Send the jobs to a running coordinator (`tollgate proxy` at this
        /// URL, e.g. http://127.0.0.1:7070) instead of running them here; a
        /// client token, if it needs one, is read from TOLLGATE_TOKEN.
        #[arg(long, conflicts_with_all = ["state", "queue"])]
        submit: Option<String>,
        /// Open an admin listener here for the length of the run: /healthz
        /// and Prometheus /metrics (behind TOLLGATE_ADMIN_TOKEN when set;
        /// required off loopback).
        #[arg(long, conflicts_with = "submit")]
        admin: Option<std::net::SocketAddr>,
    },
    /// How many calls a job set makes, and the least time the limits allow
    /// for them, before anything is sent.
    Plan {
        #[arg(long)]
        config: PathBuf,
        #[command(flatten)]
        jobs: comply::JobArgs,
        /// How long each call is assumed to take (matters for concurrency
        /// and latency limits).
        #[arg(long, default_value = "0s")]
        latency: String,
        /// Plan with the paces earlier runs learnt and kept in this state
        /// directory (a vendor that allowed less than its profile says).
        #[arg(long)]
        state: Option<PathBuf>,
        /// Draw the job set's calls over time, per upstream and workflow,
        /// in an HTML file.
        #[arg(long)]
        report: Option<PathBuf>,
    },
    /// Dead letters: list, show, retry, export.
    Dlq {
        #[command(subcommand)]
        command: comply::DlqCommand,
    },
    /// Every finished job's result line (as in results.jsonl), from a
    /// state directory or a fleet's queue in Redis.
    Results {
        #[command(flatten)]
        from: comply::StoreArgs,
        /// Write here instead of stdout.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// The bundled profiles of the APIs tollgate knows.
    Profiles {
        #[command(subcommand)]
        command: ProfilesCommand,
    },
    /// Alerts for teams that run Prometheus: the alerts a config's faces
    /// raise (defaults and [[alert]]), as Prometheus alerting rules.
    Alerts {
        #[command(subcommand)]
        command: AlertsCommand,
    },
    /// A Grafana dashboard over the metrics every face serves.
    Dashboard {
        #[command(subcommand)]
        command: DashboardCommand,
    },
}

#[derive(Subcommand)]
enum AlertsCommand {
    /// Print the alerting rules (YAML; check them with `promtool check
    /// rules FILE`).
    Rules {
        #[arg(long)]
        config: PathBuf,
    },
}

#[derive(Subcommand)]
enum DashboardCommand {
    /// Print the dashboard's JSON model (Grafana: Dashboards, Import; pick
    /// the Prometheus data source that scrapes tollgate).
    Grafana,
}

#[derive(Subcommand)]
enum ProfilesCommand {
    /// One line per profile: name, what it is, its source.
    List,
    /// A profile's policy text.
    Show { name: String },
}

#[derive(clap::Args)]
#[group(required = true, multiple = false)]
struct PolicyArgs {
    /// The policy file (TOML).
    #[arg(long)]
    config: Option<PathBuf>,
    /// A bundled profile instead of a config file.
    #[arg(long)]
    profile: Option<String>,
}

/// What `simulate --report` draws, from the replay's summary (kept with
/// its timeline).
fn replay_of(summary: &tollgate_sim::Summary, title: String) -> tollgate_watch::report::Replay {
    let seconds = |ns: u64| ns as f64 / 1e9;
    let timeline = summary.timeline.as_ref();
    let limits = summary
        .limits
        .iter()
        .enumerate()
        .map(|(i, l)| {
            let buckets = timeline.map(|t| t.limits[i].as_slice()).unwrap_or_default();
            let of =
                |f: fn(&tollgate_sim::Counts) -> u64| buckets.iter().map(|c| f(c) as f64).collect();
            tollgate_watch::report::ReplayLimit {
                name: l.name.clone(),
                admitted: of(|c| c.admitted),
                held: of(|c| c.held),
                denied: of(|c| c.denied),
                ran_out: timeline.and_then(|t| t.first_denied[i]).map(seconds),
            }
        })
        .collect();
    let mut busiest: Vec<tollgate_watch::report::ReplayKey> = summary
        .limits
        .iter()
        .flat_map(|l| {
            l.keys
                .iter()
                .map(|(key, c)| tollgate_watch::report::ReplayKey {
                    limit: l.name.clone(),
                    key: if key.is_empty() {
                        "(anonymous)".into()
                    } else {
                        key.replace('\u{1f}', "|")
                    },
                    admitted: c.admitted,
                    held: c.held,
                    denied: c.denied,
                })
        })
        .collect();
    busiest.sort_by(|a, b| {
        (b.admitted + b.held + b.denied)
            .cmp(&(a.admitted + a.held + a.denied))
            .then_with(|| a.key.cmp(&b.key))
    });
    busiest.truncate(20);
    tollgate_watch::report::Replay {
        title,
        start: timeline
            .and_then(|t| t.start)
            .map_or(0, |s| seconds(s) as i64),
        width: timeline.map_or(1, |t| (t.width / 1_000_000_000).max(1) as i64),
        requests: summary.requests,
        admitted: summary.admitted,
        held: summary.held,
        denied: summary.denied,
        errors: summary.errors,
        limits,
        busiest,
    }
}

/// A `--config FILE` or `--profile NAME` as a report names it.
fn policy_name(policy: &PolicyArgs) -> String {
    match (&policy.config, &policy.profile) {
        (Some(path), _) => path.display().to_string(),
        (None, Some(name)) => format!("profile {name}"),
        (None, None) => String::new(),
    }
}

/// The Prometheus rules of `config`'s alerts: the comply face's when it has
/// `[[upstream]]` entries (each daily limit's quota alert named), the
/// gateway's when it has limits of its own.
fn alert_rules(config: &Path) -> Result<String> {
    let text = std::fs::read_to_string(config)
        .with_context(|| format!("cannot read config {}", config.display()))?;
    let settings =
        tollgate_watch::settings::WatchSettings::parse(&text, &|v| std::env::var(v).ok())
            .map_err(|e| anyhow::anyhow!("{}: {e}", config.display()))?;
    let table: toml::Table = text
        .parse()
        .map_err(|e| anyhow::anyhow!("{}: {e}", config.display()))?;
    let faces = tollgate_watch::rules::Faces {
        comply: table.contains_key("upstream"),
        gateway: table.contains_key("limit") || table.contains_key("profile"),
    };
    let daily = if faces.comply {
        // (the limits only: a header's unset ${VAR} does not matter here)
        tollgate_egress::parse_config(&text, &tollgate_profiles::Bundled, &|_| Some(String::new()))
            .with_context(|| config.display().to_string())?
            .upstreams
            .iter()
            .flat_map(|u| u.daily_limits())
            .collect()
    } else {
        Default::default()
    };
    Ok(tollgate_watch::rules::prometheus_rules(
        &settings.rules,
        faces,
        &daily,
    ))
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("tollgate: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    let duration = |text: &str, flag: &str| {
        tollgate_core::units::parse_duration(text)
            .map(std::time::Duration::from_nanos)
            .map_err(|e| anyhow::anyhow!("{flag} '{text}': {e}"))
    };
    match cli.command {
        Command::Run {
            config,
            jobs,
            submit: Some(url),
            ..
        } => comply::submit(&config, &jobs, &url),
        Command::Run {
            config,
            jobs,
            state,
            fleet,
            progress,
            grace,
            submit: None,
            admin,
        } => comply::run(
            &config,
            &jobs,
            state.as_deref(),
            &fleet,
            progress,
            duration(&grace, "--grace")?,
            admin,
        ),
        Command::Plan {
            config,
            jobs,
            latency,
            state,
            report,
        } => comply::plan(
            &config,
            &jobs,
            duration(&latency, "--latency")?,
            state.as_deref(),
            report.as_deref(),
        )
        .map(|()| ExitCode::SUCCESS),
        Command::Dlq { command } => comply::dlq(command),
        Command::Results { from, out } => comply::results(&from, out.as_deref()),
        command => other(command).map(|()| ExitCode::SUCCESS),
    }
}

fn other(command: Command) -> Result<()> {
    match command {
        Command::Alerts {
            command: AlertsCommand::Rules { config },
        } => {
            print!("{}", alert_rules(&config)?);
            Ok(())
        }
        Command::Dashboard {
            command: DashboardCommand::Grafana,
        } => {
            let model = tollgate_watch::rules::grafana_dashboard();
            println!("{}", serde_json::to_string_pretty(&model)?);
            Ok(())
        }
        Command::Check {
            config,
            config_flag,
        } => {
            let config = config
                .or(config_flag)
                .ok_or_else(|| anyhow::anyhow!("check needs a config file"))?;
            let text = std::fs::read_to_string(&config)
                .with_context(|| format!("cannot read config {}", config.display()))?;
            if text.contains("[[upstream]]") {
                // A runner's config: what `run` loads.
                return comply::check(&config, &text);
            }
            // Exactly what `serve` loads: the limits and the gateway's tables.
            let policy = load_policy(&tollgate_gateway::Source::File(config.clone()))?;
            // Fleet mode: the limits the Redis store cannot run exactly.
            if policy.store.redis.is_some() {
                tollgate_store::redis::check_policy(&policy)
                    .map_err(|e| anyhow::anyhow!("{}: {e}", config.display()))?;
            }
            let names: Vec<_> = policy
                .limits
                .iter()
                .map(|l| match l.lease {
                    Some(lease) => format!(
                        "{} ({}, leased in slices of {} for {} ms)",
                        l.name,
                        l.algorithm.name(),
                        lease.max,
                        lease.ttl / 1_000_000
                    ),
                    None => format!("{} ({})", l.name, l.algorithm.name()),
                })
                .collect();
            println!("{}: ok, {} limits: {}", config.display(), names.len(), names.join(", "));
            Ok(())
        }
        Command::Simulate {
            policy,
            trace,
            start,
            summary,
            out,
            report,
        } => {
            let title = format!("{} on {}", trace.display(), policy_name(&policy));
            let policy = load_policy(&source_of(&policy)?)?;
            let start = parse_start(&start)?;
            let engine = Engine::new(policy);
            let input: Box<dyn BufRead> = if trace == Path::new("-") {
                Box::new(BufReader::with_capacity(1 << 20, io::stdin().lock()))
            } else {
                let file = File::open(&trace).with_context(|| format!("cannot open trace {}", trace.display()))?;
                Box::new(BufReader::with_capacity(1 << 20, file))
            };
            let decisions = out.is_some() || (!summary && report.is_none());
            let output: Box<dyn Write> = match &out {
                Some(path) => Box::new(File::create(path).with_context(|| format!("cannot write {}", path.display()))?),
                None => Box::new(io::stdout().lock()),
            };
            let options = tollgate_sim::Options {
                start,
                decisions,
                per_key: summary || report.is_some(),
                timeline: report.is_some(),
            };
            let result = tollgate_sim::simulate(&engine, options, input, output)
                .with_context(|| format!("{}", trace.display()))?;
            if summary {
                print!("{result}");
            }
            if let Some(path) = report {
                let html = tollgate_watch::report::replay(&replay_of(&result, title));
                std::fs::write(&path, html).with_context(|| format!("cannot write {}", path.display()))?;
                eprintln!("report: {}", path.display());
            }
            Ok(())
        }
        Command::Serve {
            policy,
            upstream,
            demo_upstream,
            listen,
            admin,
            access_log,
        } => serve(policy, upstream, demo_upstream, listen, admin, access_log),
        Command::Proxy {
            command: Some(ProxyCommand::Ca {
                command: CaCommand::Init { dir, config, force },
            }),
            ..
        } => ca_init(dir, config, force),
        Command::Proxy {
            command: None,
            config,
            listen,
            admin,
        } => proxy(config.context("--config is required")?, listen, admin),
        Command::Run { .. } | Command::Plan { .. } | Command::Dlq { .. } | Command::Results { .. } => {
            unreachable!("handled in run")
        }
        Command::Profiles { command } => match command {
            ProfilesCommand::List => {
                for p in tollgate_profiles::list() {
                    println!("{:<12} {}  [source: {}]", p.name, p.title, p.source);
                }
                Ok(())
            }
            ProfilesCommand::Show { name } => match tollgate_profiles::get(&name) {
                Some(text) => {
                    print!("{text}");
                    Ok(())
                }
                None => bail!("profile '{name}' is not known; `tollgate profiles list` shows the bundled ones"),
            },
        },
    }
}

/// Log lines on stderr (colored on a terminal): the servers' own messages.
fn init_logging() {
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_writer(io::stderr)
        .with_ansi(io::stderr().is_terminal())
        .with_target(false)
        .init();
}

/// `tollgate proxy ca init`: the local CA for intercepted tunnels.
fn ca_init(dir: Option<PathBuf>, config: Option<PathBuf>, force: bool) -> Result<()> {
    let dir = match (dir, config) {
        (Some(dir), _) => dir,
        (None, Some(config)) => {
            let text = std::fs::read_to_string(&config)
                .with_context(|| format!("cannot read config {}", config.display()))?;
            // Only [proxy] ca_dir matters here: tokens need not be set.
            tollgate_proxy::ProxySettings::parse(&text, &|_| Some("unset".into()))
                .with_context(|| config.display().to_string())?
                .ca_dir
        }
        (None, None) => PathBuf::from(tollgate_proxy::settings::DEFAULT_CA_DIR),
    };
    let cert = tollgate_proxy::intercept::init(&dir, force).map_err(anyhow::Error::msg)?;
    println!("created a local CA for the proxy's intercepted tunnels:");
    println!(
        "  {}   give this certificate to your clients to trust",
        cert.display()
    );
    println!(
        "  {}   its key (mode 0600): keep it here, share it with no one",
        dir.join(tollgate_proxy::intercept::KEY_FILE).display()
    );
    println!("then set intercept = true on the https upstreams to see inside their tunnels; docs/proxy.md shows how each client trusts the certificate");
    Ok(())
}

fn proxy(
    config: PathBuf,
    listen: Option<std::net::SocketAddr>,
    admin: Option<std::net::SocketAddr>,
) -> Result<()> {
    use tollgate_proxy::{Overrides, Proxy, Source};
    init_logging();
    // Many callers share each upstream's line: a multi-threaded runtime.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let overrides = Overrides {
            listen,
            admin_listen: admin,
        };
        let proxy = Proxy::new(
            Source::File(config),
            overrides,
            Box::new(tollgate_profiles::Bundled),
            tollgate_store::TokioClock::system(),
        )?;
        proxy.connect().await?;
        let listeners = proxy.listeners().await?;
        let generation = proxy.current();
        let names: Vec<&str> = generation.config.upstreams.iter().map(|u| u.name.as_str()).collect();
        tracing::info!(
            "proxy listening on http://{} (call http://{}/<upstream>/<path>, or set HTTP_PROXY) for {}; admin on {}",
            listeners.proxy.local_addr()?,
            listeners.proxy.local_addr()?,
            names.join(", "),
            listeners
                .admin
                .as_ref()
                .and_then(|a| a.local_addr().ok())
                .map_or("none".to_string(), |a| format!("http://{a}")),
        );
        let proxy = std::sync::Arc::new(proxy);
        tollgate_proxy::serve(proxy, listeners, shutdown_signal()).await?;
        Ok(())
    })
}

fn serve(
    policy: PolicyArgs,
    upstream: Option<String>,
    demo_upstream: bool,
    listen: Option<std::net::SocketAddr>,
    admin: Option<std::net::SocketAddr>,
    access_log: Option<String>,
) -> Result<()> {
    use tollgate_gateway::{AccessLog, Gateway, Overrides, TokioClock, Upstream};
    init_logging();
    let source = source_of(&policy)?;
    let access_log = match access_log.as_deref() {
        None => None,
        Some(text) => {
            Some(AccessLog::parse(text).map_err(|m| anyhow::anyhow!("--access-log {m}"))?)
        }
    };
    // Thread per core: this runtime is the first worker; serve_workers starts the others.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let upstream = match (upstream, demo_upstream) {
            (Some(url), _) => Some(Upstream::parse(&url).map_err(|m| anyhow::anyhow!("--upstream: {m}"))?),
            (None, true) => {
                let at = tollgate_gateway::demo::start(([127, 0, 0, 1], 0).into()).await?;
                tracing::info!("demo upstream listening on http://{at}");
                Some(Upstream::parse(&format!("http://{at}")).map_err(anyhow::Error::msg)?)
            }
            (None, false) => None,
        };
        let overrides = Overrides {
            listen,
            admin_listen: admin,
            upstream,
            access_log,
            // (run and proxy keep theirs in their state directory, also .tollgate)
            history_dir: Some(PathBuf::from(".tollgate")),
        };
        let gateway = Gateway::new(source, overrides, Box::new(tollgate_profiles::Bundled), TokioClock::system())?;
        let generation = gateway.current();
        // Fleet mode: a wrong URL, password or an unreachable Redis is an
        // error now, not a 503 on the first request.
        generation
            .engine
            .connect()
            .await
            .map_err(|e| anyhow::anyhow!("[store]: {e}"))?;
        if let Some(health) = generation.engine.health() {
            tracing::info!(store = %health.url(), "fleet mode: counters are shared in redis");
        }
        let settings = &generation.settings;
        if settings.upstream.is_none() && settings.routes.is_empty() && settings.rls_listen.is_none() {
            tracing::warn!("no upstream: the proxy answers 404; give --upstream URL or [gateway] upstream (the check API works without one)");
        }
        let listeners = gateway.listeners().await?;
        let workers = match generation.settings.workers {
            0 => std::thread::available_parallelism()
                .map_or(1, |n| n.get())
                .min(tollgate_gateway::MAX_WORKERS),
            n => n,
        };
        tracing::info!(
            "tollgate serving on {}://{} (admin on {}), {} worker threads, {} limits: {}",
            if gateway.tls.is_some() { "https" } else { "http" },
            listeners.proxy.local_addr()?,
            listeners.admin.as_ref().and_then(|a| a.local_addr().ok()).map_or("off".into(), |a| format!("http://{a}")),
            workers,
            generation.engine.policy().limits.len(),
            generation.engine.policy().limits.iter().map(|l| l.name.as_str()).collect::<Vec<_>>().join(", ")
        );
        if let Some(rls) = listeners.rls.as_ref().and_then(|l| l.local_addr().ok()) {
            tracing::info!("Envoy's rate limit service (gRPC, envoy.service.ratelimit.v3) on {rls}");
        }
        drop(generation);
        tollgate_gateway::serve_workers(std::sync::Arc::new(gateway), listeners, workers, shutdown_signal()).await?;
        Ok(())
    })
}

/// Ctrl-C or SIGTERM.
pub(crate) async fn shutdown_signal() {
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(t) => t,
                Err(_) => return std::future::pending().await,
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}

fn source_of(args: &PolicyArgs) -> Result<tollgate_gateway::Source> {
    match (&args.config, &args.profile) {
        (Some(path), _) => Ok(tollgate_gateway::Source::File(path.clone())),
        (None, Some(name)) => Ok(tollgate_gateway::Source::Profile(name.clone())),
        (None, None) => bail!("give --config FILE or --profile NAME"),
    }
}

/// A config's policy, loaded and checked as `serve` loads it.
fn load_policy(source: &tollgate_gateway::Source) -> Result<Policy> {
    let overrides = tollgate_gateway::Overrides::default();
    let (_, policy, _) = tollgate_gateway::load(source, &overrides, &tollgate_profiles::Bundled)?;
    Ok(policy)
}

fn parse_start(text: &str) -> Result<Nanos> {
    let ts: jiff::Timestamp = text.parse().with_context(|| {
        format!("--start '{text}' is not an RFC 3339 instant like 2026-01-01T00:00:00Z")
    })?;
    u64::try_from(ts.as_nanosecond()).with_context(|| format!("--start '{text}' is before 1970"))
}
