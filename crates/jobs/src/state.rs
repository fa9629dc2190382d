//! Durable state under `--state DIR`: `state.sqlite` records every job before
//! it is sent and its outcome after; `results.jsonl` holds one line per final
//! outcome. A run on the same state resumes what is still pending.
//!
//! Outcomes are written by one thread in batched transactions (WAL,
//! synchronous=NORMAL: a killed process loses nothing committed; a power cut
//! may lose the last batch, whose jobs are then sent again: at-least-once).
//! `results.jsonl` is written from the `results` table after each commit, in
//! order, so at startup it is a prefix of the table and the rest is appended.

use crate::job::{Job, Routed};
use rusqlite::{params, Connection, OptionalExtension};
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread::JoinHandle;
use tollgate_comply::settings::UpstreamsConfig;

/// Most outcomes committed in one transaction.
const BATCH: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state {path}: {source}")]
    Sqlite {
        path: String,
        source: rusqlite::Error,
    },
    #[error("state {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("state {path}: {message}")]
    Invalid { path: String, message: String },
    /// A job's id is in the state already, for another request.
    #[error("state {path}: job id '{id}' is already in this state for a different request; nothing was queued (give the new job another id, or use another --state)")]
    IdInUse { path: String, id: String },
}

/// A job still to be sent, as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct Pending {
    pub seq: u64,
    pub upstream: String,
    pub attempts: u32,
    pub job: Job,
}

/// A dead-lettered job and why.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct DeadLetter {
    pub id: String,
    pub upstream: String,
    pub attempts: u32,
    pub status: Option<u16>,
    pub reason: String,
    /// The start of the last response body, if there was one.
    pub excerpt: Option<String>,
    pub finished: Option<String>,
    pub job: Job,
}

/// A job's place in the state (`State::job_status`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobStatus {
    pub seq: u64,
    /// pending, done or dead.
    pub state: String,
    pub attempts: u32,
    /// Its `results.jsonl` line, once final.
    pub result: Option<String>,
    /// The proxy client that pushed it, if any.
    pub client: Option<String>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    pub pending: u64,
    pub done: u64,
    pub dead: u64,
}

/// What the runner records as jobs progress.
#[derive(Debug, Clone)]
pub enum Record {
    /// An attempt failed and the job waits for another (the count survives a crash).
    /// `sent_at`: when the last attempt went (ns since the epoch).
    Retry {
        seq: u64,
        attempts: u32,
        sent_at: u64,
    },
    /// The pace learnt for an upstream (per second), or None when calls
    /// succeed at what its limits allow: a resumed run starts from it.
    Pace { upstream: String, rate: Option<f64> },
    /// The job's final outcome and its line for `results.jsonl`.
    Final {
        seq: u64,
        dead: bool,
        attempts: u32,
        sent_at: Option<u64>,
        status: Option<u16>,
        reason: Option<String>,
        excerpt: Option<String>,
        line: String,
        /// Its result to POST to the job's callback (kept until delivered).
        callback: Option<Callback>,
    },
    /// A callback reached its receiver (2xx).
    Delivered { seq: u64 },
    /// A callback's receiver never took it: recorded, not retried.
    Undelivered { seq: u64, error: String },
}

impl Record {
    /// The dead letter a final record of `job` (of `upstream`) makes, if it
    /// is dead.
    pub fn dead_letter(&self, upstream: &str, job: &Job) -> Option<DeadLetter> {
        let Record::Final {
            dead: true,
            attempts,
            status,
            reason,
            excerpt,
            ..
        } = self
        else {
            return None;
        };
        Some(DeadLetter {
            id: job.id.clone(),
            upstream: upstream.to_string(),
            attempts: *attempts,
            status: *status,
            reason: reason.clone().unwrap_or_default(),
            excerpt: excerpt.clone(),
            finished: Some(jiff::Timestamp::now().to_string()),
            job: job.clone(),
        })
    }
}

/// A job's result on its way to the job's callback URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Callback {
    pub seq: u64,
    pub url: String,
    /// The JSON POSTed (the job's id, status, attempts and result).
    pub body: String,
}

#[derive(Debug)]
pub struct State {
    conn: Connection,
    dir: PathBuf,
    /// Held while this process owns the state (None: read-only).
    _lock: Option<File>,
}

impl State {
    /// Open (or create) the state in `dir`, and bring `results.jsonl` up to
    /// date with what was committed.
    /// One process at a time owns a state: a second `run` (or `dlq retry`)
    /// on it is refused while the first holds `DIR/lock`.
    pub fn open(dir: &Path) -> Result<State, StateError> {
        std::fs::create_dir_all(dir).map_err(|source| io_err(dir, source))?;
        let lock_path = dir.join("lock");
        let lock = File::create(&lock_path).map_err(|source| io_err(&lock_path, source))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(StateError::Invalid {
                    path: dir.display().to_string(),
                    message: "another tollgate process is using this state (wait for it, or give another --state; a `tollgate proxy` on it retries dead letters with POST /v1/dlq/retry on its admin listener)".into(),
                })
            }
            Err(std::fs::TryLockError::Error(source)) => return Err(io_err(&lock_path, source)),
        }
        let conn = connect(dir)?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS jobs (
                seq INTEGER PRIMARY KEY,
                id TEXT NOT NULL UNIQUE,
                upstream TEXT NOT NULL,
                priority INTEGER NOT NULL,
                spec TEXT NOT NULL,
                state TEXT NOT NULL DEFAULT 'pending',
                attempts INTEGER NOT NULL DEFAULT 0,
                status INTEGER,
                reason TEXT,
                excerpt TEXT,
                finished TEXT,
                sent_at INTEGER
            );
            -- No index on state: every job's insert and its final update
            -- would maintain one (7% of a run's instructions), for reads
            -- (pending at start, counts at the end, dead letters) that scan
            -- once. States made before drop theirs.
            DROP INDEX IF EXISTS jobs_state;
            CREATE TABLE IF NOT EXISTS results (n INTEGER PRIMARY KEY, seq INTEGER NOT NULL, line TEXT NOT NULL);
            CREATE TABLE IF NOT EXISTS paces (upstream TEXT PRIMARY KEY, rate REAL NOT NULL, learnt TEXT NOT NULL);
            CREATE TABLE IF NOT EXISTS callbacks (seq INTEGER PRIMARY KEY, url TEXT NOT NULL, body TEXT NOT NULL, state TEXT NOT NULL DEFAULT 'pending', error TEXT);",
        )
        .map_err(|e| sql_err(dir, e))?;
        let state = State {
            conn,
            dir: dir.to_path_buf(),
            _lock: Some(lock),
        };
        state.sync_results()?;
        Ok(state)
    }

    /// Open a state to read it (`dlq list`, `show`, `export`) while a run
    /// may own it: no lock taken, nothing written.
    pub fn open_read_only(dir: &Path) -> Result<State, StateError> {
        let path = dir.join("state.sqlite");
        let conn = Connection::open_with_flags(&path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .map_err(|e| sql_err(&path, e))?;
        conn.busy_timeout(std::time::Duration::from_secs(10))
            .map_err(|e| sql_err(&path, e))?;
        Ok(State {
            conn,
            dir: dir.to_path_buf(),
            _lock: None,
        })
    }

    /// Jobs whose last attempt went at or after `since` (ns since the
    /// epoch), oldest first, with that instant: a resumed run replays them
    /// into its counters so it starts from the quota the last run left.
    /// (Earlier attempts of a retried job, and attempts in flight at a
    /// crash, are not counted.)
    pub fn sends_since(&self, since: u64) -> Result<Vec<(u64, String, Job)>, StateError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT sent_at, upstream, spec FROM jobs WHERE sent_at >= ?1 ORDER BY sent_at",
            )
            .map_err(|e| self.sql(e))?;
        let rows = stmt
            .query_map([since as i64], |r| {
                Ok((
                    r.get::<_, i64>(0)? as u64,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                ))
            })
            .map_err(|e| self.sql(e))?;
        let mut out = Vec::new();
        for row in rows {
            let (at, upstream, spec) = row.map_err(|e| self.sql(e))?;
            out.push((at, upstream, self.job(&spec)?));
        }
        Ok(out)
    }

    /// The pace learnt per upstream (per second) by the runs before: the
    /// upstreams whose vendor allowed less than their limits say.
    pub fn paces(&self) -> Result<HashMap<String, f64>, StateError> {
        // A state written before paces were kept has no such table.
        let exists: bool = self
            .conn
            .query_row(
                "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'paces')",
                [],
                |r| r.get(0),
            )
            .map_err(|e| self.sql(e))?;
        if !exists {
            return Ok(HashMap::new());
        }
        let mut stmt = self
            .conn
            .prepare("SELECT upstream, rate FROM paces")
            .map_err(|e| self.sql(e))?;
        let rows = stmt
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, f64>(1)?)))
            .map_err(|e| self.sql(e))?;
        rows.collect::<Result<_, _>>().map_err(|e| self.sql(e))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Record jobs (one transaction, before anything is sent). A job whose id
    /// is already in the state is left as it is: that is how a re-run resumes.
    /// Returns (added, already there).
    pub fn import(
        &mut self,
        jobs: &[Routed],
        config: &UpstreamsConfig,
    ) -> Result<(u64, u64), StateError> {
        let seqs = self.enqueue(jobs, config)?;
        let added = seqs.iter().flatten().count() as u64;
        Ok((added, jobs.len() as u64 - added))
    }

    /// `import`, telling each job's row: `Some(seq)` for a job added now,
    /// None for one that was already there.
    pub fn enqueue(
        &mut self,
        jobs: &[Routed],
        config: &UpstreamsConfig,
    ) -> Result<Vec<Option<u64>>, StateError> {
        let dir = self.dir.clone();
        let tx = self.conn.transaction().map_err(|e| sql_err(&dir, e))?;
        let mut seqs = Vec::with_capacity(jobs.len());
        {
            let mut insert = tx
                .prepare("INSERT OR IGNORE INTO jobs (id, upstream, priority, spec) VALUES (?1, ?2, ?3, ?4)")
                .map_err(|e| sql_err(&dir, e))?;
            let mut stored = tx
                .prepare("SELECT spec FROM jobs WHERE id = ?1")
                .map_err(|e| sql_err(&dir, e))?;
            for routed in jobs {
                let spec = serde_json::to_string(&routed.job).unwrap_or_default();
                let inserted = insert
                    .execute(params![
                        routed.job.id,
                        config.upstreams[routed.upstream].name,
                        routed.job.priority.rank() as i64,
                        spec
                    ])
                    .map_err(|e| sql_err(&dir, e))?;
                if inserted == 0 {
                    // Resuming is fine; the same id for another request is
                    // a mistake that would silently skip the new one.
                    let before: String = stored
                        .query_row([&routed.job.id], |r| r.get(0))
                        .map_err(|e| sql_err(&dir, e))?;
                    if before != spec {
                        return Err(StateError::IdInUse {
                            path: dir.display().to_string(),
                            id: routed.job.id.clone(),
                        });
                    }
                    seqs.push(None);
                } else {
                    // (seq is the row id)
                    seqs.push(Some(tx.last_insert_rowid() as u64));
                }
            }
        }
        tx.commit().map_err(|e| sql_err(&dir, e))?;
        Ok(seqs)
    }

    /// Callbacks not yet delivered nor given up on, oldest first (a restart
    /// delivers them: at least once).
    pub fn pending_callbacks(&self) -> Result<Vec<Callback>, StateError> {
        let mut stmt = self
            .conn
            .prepare("SELECT seq, url, body FROM callbacks WHERE state = 'pending' ORDER BY seq")
            .map_err(|e| self.sql(e))?;
        let rows = stmt
            .query_map([], |r| {
                Ok(Callback {
                    seq: r.get::<_, i64>(0)? as u64,
                    url: r.get(1)?,
                    body: r.get(2)?,
                })
            })
            .map_err(|e| self.sql(e))?;
        rows.collect::<Result<_, _>>().map_err(|e| self.sql(e))
    }

    /// Callbacks by state (pending, delivered, undelivered).
    pub fn callback_counts(&self) -> Result<HashMap<String, u64>, StateError> {
        let mut stmt = self
            .conn
            .prepare("SELECT state, COUNT(*) FROM callbacks GROUP BY state")
            .map_err(|e| self.sql(e))?;
        let rows = stmt
            .query_map([], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64))
            })
            .map_err(|e| self.sql(e))?;
        rows.collect::<Result<_, _>>().map_err(|e| self.sql(e))
    }

    /// Where a job is: its row, state (pending, done or dead), attempts
    /// recorded, and its `results.jsonl` line once it has one.
    pub fn job_status(&self, id: &str) -> Result<Option<JobStatus>, StateError> {
        self.conn
            .query_row(
                // (a dead letter retried has a line per outcome: the latest)
                "SELECT j.seq, j.state, j.attempts, (SELECT line FROM results r WHERE r.seq = j.seq ORDER BY r.n DESC LIMIT 1), j.spec FROM jobs j WHERE j.id = ?1",
                [id],
                |r| {
                    let spec: String = r.get(4)?;
                    Ok(JobStatus {
                        seq: r.get::<_, i64>(0)? as u64,
                        state: r.get(1)?,
                        attempts: r.get(2)?,
                        result: r.get(3)?,
                        client: serde_json::from_str::<Job>(&spec).ok().and_then(|j| j.client),
                    })
                },
            )
            .optional()
            .map_err(|e| self.sql(e))
    }

    pub fn counts(&self) -> Result<Counts, StateError> {
        let mut counts = Counts::default();
        let mut stmt = self
            .conn
            .prepare("SELECT state, COUNT(*) FROM jobs GROUP BY state")
            .map_err(|e| self.sql(e))?;
        let rows = stmt
            .query_map([], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64))
            })
            .map_err(|e| self.sql(e))?;
        for row in rows {
            let (state, n) = row.map_err(|e| self.sql(e))?;
            match state.as_str() {
                "pending" => counts.pending = n,
                "done" => counts.done = n,
                _ => counts.dead = n,
            }
        }
        Ok(counts)
    }

    /// Every pending job, oldest first.
    pub fn pending(&self) -> Result<Vec<Pending>, StateError> {
        self.pending_before(i64::MAX)
    }

    /// `import`, then every pending job, oldest first, as `pending` would
    /// read them: the jobs added now are taken from `jobs` rather than read
    /// back and parsed again (a run of many jobs would hold them twice, and
    /// parse each a second time). Returns (added, already there, pending).
    pub fn import_pending(
        &mut self,
        jobs: Vec<Routed>,
        config: &UpstreamsConfig,
    ) -> Result<(u64, u64, Vec<Pending>), StateError> {
        let seqs = self.enqueue(&jobs, config)?;
        // Rows added now have the highest seqs: the ones before them are the
        // jobs pending from earlier runs (including any that were given again).
        let first_added = seqs.iter().flatten().min().map_or(i64::MAX, |&s| s as i64);
        let mut pending = self.pending_before(first_added)?;
        let older = pending.len();
        for (routed, seq) in jobs.into_iter().zip(&seqs) {
            if let Some(seq) = *seq {
                pending.push(Pending {
                    seq,
                    upstream: config.upstreams[routed.upstream].name.clone(),
                    attempts: 0,
                    job: routed.job,
                });
            }
        }
        let added = (pending.len() - older) as u64;
        Ok((added, seqs.len() as u64 - added, pending))
    }

    /// The pending jobs of a seq below `end`, oldest first.
    fn pending_before(&self, end: i64) -> Result<Vec<Pending>, StateError> {
        let mut stmt = self
            .conn
            .prepare("SELECT seq, upstream, attempts, spec FROM jobs WHERE state = 'pending' AND seq < ?1 ORDER BY seq")
            .map_err(|e| self.sql(e))?;
        let rows = stmt
            .query_map([end], |r| {
                Ok((
                    r.get::<_, i64>(0)? as u64,
                    r.get::<_, String>(1)?,
                    r.get::<_, u32>(2)?,
                    r.get::<_, String>(3)?,
                ))
            })
            .map_err(|e| self.sql(e))?;
        let mut out = Vec::new();
        for row in rows {
            let (seq, upstream, attempts, spec) = row.map_err(|e| self.sql(e))?;
            out.push(Pending {
                seq,
                upstream,
                attempts,
                job: self.job(&spec)?,
            });
        }
        Ok(out)
    }

    pub fn dead_letters(&self) -> Result<Vec<DeadLetter>, StateError> {
        self.dead_where("state = 'dead' ORDER BY seq", None)
    }

    pub fn dead_letter(&self, id: &str) -> Result<Option<DeadLetter>, StateError> {
        Ok(self
            .dead_where("state = 'dead' AND id = ?1", Some(id))?
            .pop())
    }

    fn dead_where(&self, filter: &str, id: Option<&str>) -> Result<Vec<DeadLetter>, StateError> {
        let sql = format!("SELECT id, upstream, attempts, status, reason, excerpt, finished, spec FROM jobs WHERE {filter}");
        let mut stmt = self.conn.prepare(&sql).map_err(|e| self.sql(e))?;
        let map = |r: &rusqlite::Row<'_>| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, u32>(2)?,
                r.get::<_, Option<u16>>(3)?,
                r.get::<_, Option<String>>(4)?,
                r.get::<_, Option<String>>(5)?,
                r.get::<_, Option<String>>(6)?,
                r.get::<_, String>(7)?,
            ))
        };
        let rows: Vec<_> = match id {
            Some(id) => stmt.query_map([id], map),
            None => stmt.query_map([], map),
        }
        .map_err(|e| self.sql(e))?
        .collect::<Result<_, _>>()
        .map_err(|e| self.sql(e))?;
        rows.into_iter()
            .map(
                |(id, upstream, attempts, status, reason, excerpt, finished, spec)| {
                    Ok(DeadLetter {
                        id,
                        upstream,
                        attempts,
                        status,
                        reason: reason.unwrap_or_default(),
                        excerpt,
                        finished,
                        job: self.job(&spec)?,
                    })
                },
            )
            .collect()
    }

    /// Queue dead letters again with a fresh attempt count: the ones named,
    /// or all when `ids` is empty. Returns the ids requeued, and the ids named
    /// that are not dead letters.
    pub fn requeue_dead(
        &mut self,
        ids: &[String],
    ) -> Result<(Vec<String>, Vec<String>), StateError> {
        let dir = self.dir.clone();
        let tx = self.conn.transaction().map_err(|e| sql_err(&dir, e))?;
        let mut requeued = Vec::new();
        let mut unknown = Vec::new();
        {
            let targets: Vec<String> = if ids.is_empty() {
                let mut stmt = tx
                    .prepare("SELECT id FROM jobs WHERE state = 'dead' ORDER BY seq")
                    .map_err(|e| sql_err(&dir, e))?;
                let ids = stmt
                    .query_map([], |r| r.get::<_, String>(0))
                    .map_err(|e| sql_err(&dir, e))?
                    .collect::<Result<_, _>>()
                    .map_err(|e| sql_err(&dir, e))?;
                ids
            } else {
                ids.to_vec()
            };
            let mut update = tx
                .prepare("UPDATE jobs SET state = 'pending', attempts = 0, status = NULL, reason = NULL, excerpt = NULL, finished = NULL WHERE id = ?1 AND state = 'dead'")
                .map_err(|e| sql_err(&dir, e))?;
            for id in targets {
                if update.execute([&id]).map_err(|e| sql_err(&dir, e))? == 1 {
                    requeued.push(id);
                } else {
                    unknown.push(id);
                }
            }
        }
        tx.commit().map_err(|e| sql_err(&dir, e))?;
        Ok((requeued, unknown))
    }

    /// Start the thread that records outcomes.
    pub fn writer(&self) -> Result<Writer, StateError> {
        let conn = connect(&self.dir)?;
        let results = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.results_path())
            .map_err(|source| io_err(&self.results_path(), source))?;
        let (tx, rx) = mpsc::channel::<Record>();
        let dir = self.dir.clone();
        let handle = std::thread::Builder::new()
            .name("tollgate-state".into())
            .spawn(move || write_records(conn, BufWriter::new(results), rx, &dir))
            .map_err(|source| io_err(&self.dir, source))?;
        Ok(Writer { tx, handle })
    }

    pub fn results_path(&self) -> PathBuf {
        self.dir.join("results.jsonl")
    }

    /// Append to `results.jsonl` what the table has past its last full line
    /// (after a crash between a commit and the file write), dropping a torn
    /// last line.
    fn sync_results(&self) -> Result<(), StateError> {
        let path = self.results_path();
        let mut file = OpenOptions::new()
            .create(true)
            .read(true)
            .write(true)
            .truncate(false)
            .open(&path)
            .map_err(|source| io_err(&path, source))?;
        let mut text = Vec::new();
        file.read_to_end(&mut text)
            .map_err(|source| io_err(&path, source))?;
        let complete = text.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        if complete < text.len() {
            file.set_len(complete as u64)
                .map_err(|source| io_err(&path, source))?;
        }
        let lines = text[..complete].iter().filter(|&&b| b == b'\n').count() as i64;
        file.seek(SeekFrom::End(0))
            .map_err(|source| io_err(&path, source))?;
        let mut stmt = self
            .conn
            .prepare("SELECT line FROM results ORDER BY n LIMIT -1 OFFSET ?1")
            .map_err(|e| self.sql(e))?;
        let rows = stmt
            .query_map([lines], |r| r.get::<_, String>(0))
            .map_err(|e| self.sql(e))?;
        let mut out = BufWriter::new(&mut file);
        for line in rows {
            let line = line.map_err(|e| self.sql(e))?;
            writeln!(out, "{line}").map_err(|source| io_err(&path, source))?;
        }
        out.flush().map_err(|source| io_err(&path, source))
    }

    fn job(&self, spec: &str) -> Result<Job, StateError> {
        serde_json::from_str(spec).map_err(|e| StateError::Invalid {
            path: self.dir.display().to_string(),
            message: format!("a stored job cannot be read: {e}"),
        })
    }

    fn sql(&self, e: rusqlite::Error) -> StateError {
        sql_err(&self.dir, e)
    }
}

/// The handle of the thread that records outcomes.
#[derive(Debug)]
pub struct Writer {
    tx: mpsc::Sender<Record>,
    handle: JoinHandle<Result<(), StateError>>,
}

impl Writer {
    pub fn record(&self, record: Record) {
        // If the thread has stopped, `finish` reports why.
        let _ = self.tx.send(record);
    }

    /// False once the thread has stopped (on an error): the run must stop
    /// sending, since nothing it learns can be recorded.
    pub fn alive(&self) -> bool {
        !self.handle.is_finished()
    }

    /// Commit what is queued and stop.
    pub fn finish(self) -> Result<(), StateError> {
        drop(self.tx);
        self.handle.join().unwrap_or_else(|_| {
            Err(StateError::Invalid {
                path: String::new(),
                message: "the state writer panicked".into(),
            })
        })
    }
}

fn write_records(
    mut conn: Connection,
    mut results: BufWriter<File>,
    rx: mpsc::Receiver<Record>,
    dir: &Path,
) -> Result<(), StateError> {
    let mut batch = Vec::with_capacity(BATCH);
    let mut lines = Vec::new();
    while let Ok(first) = rx.recv() {
        batch.push(first);
        while batch.len() < BATCH {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        let tx = conn.transaction().map_err(|e| sql_err(dir, e))?;
        {
            let mut retry = tx
                .prepare_cached(
                    "UPDATE jobs SET attempts = ?2, sent_at = ?3 WHERE seq = ?1 AND state = 'pending'",
                )
                .map_err(|e| sql_err(dir, e))?;
            let mut finish = tx
                .prepare_cached("UPDATE jobs SET state = ?2, attempts = ?3, status = ?4, reason = ?5, excerpt = ?6, finished = ?7, sent_at = ?8 WHERE seq = ?1 AND state = 'pending'")
                .map_err(|e| sql_err(dir, e))?;
            let mut result = tx
                .prepare_cached("INSERT INTO results (seq, line) VALUES (?1, ?2)")
                .map_err(|e| sql_err(dir, e))?;
            let mut learnt = tx
                .prepare_cached(
                    "INSERT OR REPLACE INTO paces (upstream, rate, learnt) VALUES (?1, ?2, ?3)",
                )
                .map_err(|e| sql_err(dir, e))?;
            let mut forgotten = tx
                .prepare_cached("DELETE FROM paces WHERE upstream = ?1")
                .map_err(|e| sql_err(dir, e))?;
            let mut callback = tx
                .prepare_cached(
                    "INSERT OR REPLACE INTO callbacks (seq, url, body) VALUES (?1, ?2, ?3)",
                )
                .map_err(|e| sql_err(dir, e))?;
            let mut delivered = tx
                .prepare_cached("UPDATE callbacks SET state = ?2, error = ?3 WHERE seq = ?1")
                .map_err(|e| sql_err(dir, e))?;
            let now = jiff::Timestamp::now().to_string();
            for record in batch.drain(..) {
                match record {
                    Record::Retry {
                        seq,
                        attempts,
                        sent_at,
                    } => {
                        retry
                            .execute(params![seq as i64, attempts, sent_at as i64])
                            .map_err(|e| sql_err(dir, e))?;
                    }
                    Record::Pace { upstream, rate } => {
                        match rate {
                            Some(rate) => learnt.execute(params![upstream, rate, now]),
                            None => forgotten.execute(params![upstream]),
                        }
                        .map_err(|e| sql_err(dir, e))?;
                    }
                    Record::Final {
                        seq,
                        dead,
                        attempts,
                        sent_at,
                        status,
                        reason,
                        excerpt,
                        line,
                        callback: to_deliver,
                    } => {
                        let state = if dead { "dead" } else { "done" };
                        let changed = finish
                            .execute(params![
                                seq as i64,
                                state,
                                attempts,
                                status,
                                reason,
                                excerpt,
                                now,
                                sent_at.map(|at| at as i64)
                            ])
                            .map_err(|e| sql_err(dir, e))?;
                        // One result per final outcome, even if a record repeats.
                        if changed == 1 {
                            result
                                .execute(params![seq as i64, line])
                                .map_err(|e| sql_err(dir, e))?;
                            lines.push(line);
                            if let Some(c) = to_deliver {
                                callback
                                    .execute(params![c.seq as i64, c.url, c.body])
                                    .map_err(|e| sql_err(dir, e))?;
                            }
                        }
                    }
                    Record::Delivered { seq } => {
                        delivered
                            .execute(params![seq as i64, "delivered", None::<String>])
                            .map_err(|e| sql_err(dir, e))?;
                    }
                    Record::Undelivered { seq, error } => {
                        delivered
                            .execute(params![seq as i64, "undelivered", error])
                            .map_err(|e| sql_err(dir, e))?;
                    }
                }
            }
        }
        tx.commit().map_err(|e| sql_err(dir, e))?;
        for line in lines.drain(..) {
            writeln!(results, "{line}").map_err(|source| io_err(dir, source))?;
        }
        results.flush().map_err(|source| io_err(dir, source))?;
    }
    results
        .get_ref()
        .sync_data()
        .map_err(|source| io_err(dir, source))
}

fn connect(dir: &Path) -> Result<Connection, StateError> {
    let path = dir.join("state.sqlite");
    let conn = Connection::open(&path).map_err(|e| sql_err(&path, e))?;
    conn.busy_timeout(std::time::Duration::from_secs(10))
        .map_err(|e| sql_err(&path, e))?;
    conn.pragma_update(None, "journal_mode", "WAL")
        .map_err(|e| sql_err(&path, e))?;
    conn.pragma_update(None, "synchronous", "NORMAL")
        .map_err(|e| sql_err(&path, e))?;
    Ok(conn)
}

fn sql_err(path: &Path, source: rusqlite::Error) -> StateError {
    StateError::Sqlite {
        path: path.display().to_string(),
        source,
    }
}

fn io_err(path: &Path, source: std::io::Error) -> StateError {
    StateError::Io {
        path: path.display().to_string(),
        source,
    }
}

impl State {
    /// A job's state (pending, done or dead), if the id is known.
    pub fn job_state(&self, id: &str) -> Result<Option<String>, StateError> {
        self.conn
            .query_row("SELECT state FROM jobs WHERE id = ?1", [id], |r| r.get(0))
            .optional()
            .map_err(|e| self.sql(e))
    }
}
