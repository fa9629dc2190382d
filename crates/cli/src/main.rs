//! The `tollgate` binary: parses arguments, loads config, wires the pieces.

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use std::fs::File;
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use tollgate_core::{Nanos, Policy};
use tollgate_store::Engine;

#[derive(Parser)]
#[command(
    name = "tollgate",
    version,
    about = "One rate-limit engine with two faces: enforce quotas, comply with them."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Validate a config; errors name the line, the limit and the field.
    Check {
        /// The policy file (TOML).
        config: PathBuf,
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
    },
    /// The bundled profiles of the APIs tollgate knows.
    Profiles {
        #[command(subcommand)]
        command: ProfilesCommand,
    },
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

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tollgate: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Check { config } => {
            let policy = load_config(&config)?;
            let names: Vec<_> = policy
                .limits
                .iter()
                .map(|l| format!("{} ({})", l.name, l.algorithm.name()))
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
        } => {
            let policy = load_policy(&policy)?;
            let start = parse_start(&start)?;
            let engine = Engine::new(policy);
            let input: Box<dyn BufRead> = if trace == Path::new("-") {
                Box::new(BufReader::with_capacity(1 << 20, io::stdin().lock()))
            } else {
                let file = File::open(&trace).with_context(|| format!("cannot open trace {}", trace.display()))?;
                Box::new(BufReader::with_capacity(1 << 20, file))
            };
            let decisions = out.is_some() || !summary;
            let output: Box<dyn Write> = match &out {
                Some(path) => Box::new(File::create(path).with_context(|| format!("cannot write {}", path.display()))?),
                None => Box::new(io::stdout().lock()),
            };
            let options = tollgate_sim::Options {
                start,
                decisions,
                per_key: summary,
            };
            let result = tollgate_sim::simulate(&engine, options, input, output)
                .with_context(|| format!("{}", trace.display()))?;
            if summary {
                print!("{result}");
            }
            Ok(())
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

fn load_policy(args: &PolicyArgs) -> Result<Policy> {
    match (&args.config, &args.profile) {
        (Some(path), _) => load_config(path),
        (None, Some(name)) => {
            let text = format!("profile = {name:?}\n");
            tollgate_core::parse(&text, &tollgate_profiles::Bundled)
                .map_err(|e| anyhow::anyhow!("{}", e.message))
        }
        (None, None) => bail!("give --config FILE or --profile NAME"),
    }
}

fn load_config(path: &Path) -> Result<Policy> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read config {}", path.display()))?;
    tollgate_core::parse(&text, &tollgate_profiles::Bundled).map_err(|e| match e.line {
        Some(line) => anyhow::anyhow!("{}:{line}: {}", path.display(), e.message),
        None => anyhow::anyhow!("{}: {}", path.display(), e.message),
    })
}

fn parse_start(text: &str) -> Result<Nanos> {
    let ts: jiff::Timestamp = text.parse().with_context(|| {
        format!("--start '{text}' is not an RFC 3339 instant like 2026-01-01T00:00:00Z")
    })?;
    u64::try_from(ts.as_nanosecond()).with_context(|| format!("--start '{text}' is before 1970"))
}
