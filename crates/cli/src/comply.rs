//! The comply face's commands: `run`, `plan` and `dlq`.

use anyhow::{bail, Context, Result};
use std::fs::File;
use std::io::{self, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;
use tollgate_core::Clock;
use tollgate_egress::{run::human, Options, ProgressMode, Routed, RunnerConfig, State};
use tollgate_store::TokioClock;

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

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum Progress {
    /// A bar on a terminal, a line every 500 jobs otherwise.
    Auto,
    /// A line every 500 jobs.
    Lines,
    /// Only the summary.
    Quiet,
}

pub fn load_config(path: &Path) -> Result<RunnerConfig> {
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
    for name in missing.into_inner() {
        println!("  note: environment variable {name} is not set; `tollgate run` will need it");
    }
    Ok(())
}

fn read_jobs(args: &JobArgs, config: &RunnerConfig) -> Result<Option<Vec<Routed>>> {
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

/// `tollgate run`: queue the jobs in the state, then send every pending one.
pub fn run(
    config_path: &Path,
    jobs: &JobArgs,
    state_dir: &Path,
    progress: Progress,
    grace: Duration,
) -> Result<ExitCode> {
    let config = load_config(config_path)?;
    let routed = read_jobs(jobs, &config)?;
    let mut state = State::open(state_dir)?;
    if let Some(routed) = &routed {
        let (added, already) = state.import(routed, &config)?;
        eprintln!(
            "tollgate run: {added} job(s) queued in {}{}",
            state_dir.display(),
            if already > 0 {
                format!(" ({already} already there, resumed as they were)")
            } else {
                String::new()
            }
        );
    }
    execute(&config, &state, config_path, progress, grace)
}

/// Send every pending job of the state and print the summary.
fn execute(
    config: &RunnerConfig,
    state: &State,
    config_path: &Path,
    progress: Progress,
    grace: Duration,
) -> Result<ExitCode> {
    let pending = state.counts()?.pending;
    if pending == 0 {
        eprintln!("tollgate run: nothing pending in {}", state.dir().display());
    }
    let options = Options {
        progress: match progress {
            Progress::Auto => ProgressMode::Auto,
            Progress::Lines => ProgressMode::Lines,
            Progress::Quiet => ProgressMode::Quiet,
        },
        grace,
        ..Options::default()
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let summary = runtime.block_on(tollgate_egress::run(
        config,
        state,
        TokioClock::system(),
        options,
        crate::shutdown_signal(),
    ))?;
    println!("tollgate run: {}", summary.describe());
    println!("results: {}", state.results_path().display());
    if summary.interrupted {
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
pub fn plan(config_path: &Path, jobs: &JobArgs, latency: Duration) -> Result<()> {
    let config = load_config(config_path)?;
    let Some(routed) = read_jobs(jobs, &config)? else {
        bail!("give --jobs FILE, or --records FILE --bulk NAME");
    };
    let start = TokioClock::system().now();
    let plans = tollgate_egress::plan::plan_jobs(&config, &routed, start, latency);
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
    Ok(())
}

#[derive(clap::Subcommand, Debug)]
pub enum DlqCommand {
    /// One line per dead letter: id, upstream, attempts, status, reason.
    List {
        #[arg(long, default_value = ".tollgate")]
        state: PathBuf,
    },
    /// A dead letter in full: the request, its reason, the response's start.
    Show {
        id: String,
        #[arg(long, default_value = ".tollgate")]
        state: PathBuf,
    },
    /// Queue dead letters again (fresh attempts) and run them now.
    Retry {
        /// The ids to retry (or --all).
        ids: Vec<String>,
        #[arg(long, conflicts_with = "ids")]
        all: bool,
        #[arg(long)]
        config: PathBuf,
        #[arg(long, default_value = ".tollgate")]
        state: PathBuf,
        #[arg(long, value_enum, default_value = "auto")]
        progress: Progress,
    },
    /// Write dead letters as job lines (`--jobs` reads them back), each with
    /// a `dead_letter` field saying why.
    Export {
        #[arg(long, default_value = ".tollgate")]
        state: PathBuf,
        /// Write here instead of stdout.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

pub fn dlq(command: DlqCommand) -> Result<ExitCode> {
    let exists = |dir: &Path| -> Result<()> {
        if !dir.join("state.sqlite").exists() {
            bail!("no tollgate state in {} (give --state DIR)", dir.display());
        }
        Ok(())
    };
    // Reading never takes the state from a run that owns it.
    let open = |dir: &Path| -> Result<State> {
        exists(dir)?;
        Ok(State::open_read_only(dir)?)
    };
    match command {
        DlqCommand::List { state } => {
            let letters = open(&state)?.dead_letters()?;
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
        DlqCommand::Show { id, state } => {
            let state = open(&state)?;
            match state.dead_letter(&id)? {
                Some(d) => println!("{}", serde_json::to_string_pretty(&d)?),
                None => match state.job_state(&id)? {
                    Some(s) => bail!("job '{id}' is not a dead letter (it is {s})"),
                    None => bail!("no job '{id}' in {}", state.dir().display()),
                },
            }
        }
        DlqCommand::Retry {
            ids,
            all,
            config,
            state,
            progress,
        } => {
            if ids.is_empty() && !all {
                bail!("name the dead letters to retry, or give --all");
            }
            let runner = load_config(&config)?;
            exists(&state)?;
            let mut opened = State::open(&state)?;
            let (requeued, unknown) = opened.requeue_dead(&ids)?;
            if !unknown.is_empty() {
                eprintln!(
                    "not dead letters (left as they are): {}",
                    unknown.join(", ")
                );
            }
            eprintln!(
                "tollgate dlq: {} dead letter(s) queued again",
                requeued.len()
            );
            return execute(&runner, &opened, &config, progress, Duration::from_secs(10));
        }
        DlqCommand::Export { state, out } => {
            let letters = open(&state)?.dead_letters()?;
            let mut output: Box<dyn Write> = match &out {
                Some(path) => Box::new(
                    File::create(path)
                        .with_context(|| format!("cannot write {}", path.display()))?,
                ),
                None => Box::new(io::stdout().lock()),
            };
            for d in &letters {
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
                        line["body"] =
                            serde_json::from_str(body).unwrap_or_else(|_| body.clone().into());
                    }
                    (Some(body), false) => line["body_text"] = body.clone().into(),
                    (None, _) => {}
                }
                writeln!(output, "{line}")?;
            }
            output.flush()?;
            eprintln!("{} dead letter(s) exported", letters.len());
        }
    }
    Ok(ExitCode::SUCCESS)
}
