//! History written to a SQLite file, so the charts still show the last
//! hours and days after a restart: one row per series and bucket, upserted
//! as buckets change, pruned past 48 hours of minutes and 30 days of hours.

use crate::history::{Resolution, Row};
use crate::sample::Kind;
use rusqlite::{params, Connection};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
#[error("history file {path}: {message}")]
pub struct PersistError {
    pub path: PathBuf,
    pub message: String,
}

/// The history's SQLite file.
#[derive(Debug)]
pub struct HistoryFile {
    path: PathBuf,
    conn: Connection,
    /// The hour last pruned, so pruning runs once an hour.
    pruned: i64,
}

impl HistoryFile {
    /// Open (creating the file and its directory) the history at `path`.
    pub fn open(path: &Path) -> Result<HistoryFile, PersistError> {
        let fail = |message: String| PersistError {
            path: path.to_path_buf(),
            message,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| fail(format!("cannot create its directory: {e}")))?;
        }
        let conn = Connection::open(path).map_err(|e| fail(e.to_string()))?;
        // One process per history file: the lock is taken now and kept
        // (two gateways started in one directory would otherwise write over
        // each other's buckets); the second is told so at once.
        conn.execute_batch(
            "PRAGMA busy_timeout = 0;
             PRAGMA locking_mode = EXCLUSIVE;
             PRAGMA journal_mode = WAL;
             BEGIN EXCLUSIVE; COMMIT;",
        )
        .map_err(|e| fail(format!("in use by another process? ({e})")))?;
        conn.execute_batch(
            "PRAGMA synchronous = NORMAL;
             CREATE TABLE IF NOT EXISTS history (
                 series TEXT NOT NULL,
                 kind TEXT NOT NULL,
                 resolution INTEGER NOT NULL,
                 bucket INTEGER NOT NULL,
                 value REAL NOT NULL,
                 PRIMARY KEY (series, resolution, bucket)
             ) WITHOUT ROWID;
             CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);",
        )
        .map_err(|e| fail(e.to_string()))?;
        Ok(HistoryFile {
            path: path.to_path_buf(),
            conn,
            pruned: 0,
        })
    }

    fn fail(&self, e: rusqlite::Error) -> PersistError {
        PersistError {
            path: self.path.clone(),
            message: e.to_string(),
        }
    }

    /// This history's name among a fleet's, kept in the file: a restarted
    /// process writes its buckets to Redis under the same name, so the
    /// buckets it restored are replaced there, not counted twice.
    pub fn node(&self, fresh: impl FnOnce() -> String) -> Result<String, PersistError> {
        let kept: Option<String> = self
            .conn
            .query_row("SELECT value FROM meta WHERE name = 'node'", [], |r| {
                r.get(0)
            })
            .ok();
        if let Some(node) = kept {
            return Ok(node);
        }
        let node = fresh();
        self.conn
            .execute(
                "INSERT OR REPLACE INTO meta (name, value) VALUES ('node', ?1)",
                params![node],
            )
            .map_err(|e| self.fail(e))?;
        Ok(node)
    }

    /// Every bucket still kept at `now`.
    pub fn load(&self, now: i64) -> Result<Vec<Row>, PersistError> {
        let mut rows = Vec::new();
        for resolution in Resolution::ALL {
            let oldest = resolution.bucket(now) - (resolution.kept() - 1) * resolution.seconds();
            let mut stmt = self
                .conn
                .prepare_cached(
                    "SELECT series, kind, bucket, value FROM history
                     WHERE resolution = ?1 AND bucket >= ?2",
                )
                .map_err(|e| self.fail(e))?;
            let found = stmt
                .query_map(params![resolution.code(), oldest], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, i64>(2)?,
                        r.get::<_, f64>(3)?,
                    ))
                })
                .map_err(|e| self.fail(e))?;
            for row in found {
                let (key, kind, bucket, value) = row.map_err(|e| self.fail(e))?;
                let Some(kind) = Kind::parse(&kind) else {
                    continue;
                };
                rows.push(Row {
                    key,
                    kind,
                    resolution,
                    bucket,
                    value,
                });
            }
        }
        Ok(rows)
    }

    /// Write changed buckets (one transaction), and once an hour drop what
    /// is no longer kept.
    pub fn save(&mut self, rows: &[Row], now: i64) -> Result<(), PersistError> {
        let path = self.path.clone();
        let fail = move |e: rusqlite::Error| PersistError {
            path: path.clone(),
            message: e.to_string(),
        };
        let hour = Resolution::Hour.bucket(now);
        let prune = hour != self.pruned;
        let tx = self.conn.transaction().map_err(&fail)?;
        {
            let mut stmt = tx
                .prepare_cached(
                    "INSERT INTO history (series, kind, resolution, bucket, value)
                     VALUES (?1, ?2, ?3, ?4, ?5)
                     ON CONFLICT (series, resolution, bucket) DO UPDATE SET value = excluded.value",
                )
                .map_err(&fail)?;
            for row in rows {
                stmt.execute(params![
                    row.key,
                    row.kind.as_str(),
                    row.resolution.code(),
                    row.bucket,
                    row.value
                ])
                .map_err(&fail)?;
            }
            if prune {
                for resolution in Resolution::ALL {
                    let oldest =
                        resolution.bucket(now) - (resolution.kept() - 1) * resolution.seconds();
                    tx.execute(
                        "DELETE FROM history WHERE resolution = ?1 AND bucket < ?2",
                        params![resolution.code(), oldest],
                    )
                    .map_err(&fail)?;
                }
            }
        }
        tx.commit().map_err(&fail)?;
        if prune {
            self.pruned = hour;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::History;
    use crate::sample::parse;

    #[test]
    fn a_reopened_file_gives_back_the_history_it_was_given() {
        let dir = std::env::temp_dir().join(format!("tollgate-history-{}", std::process::id()));
        let path = dir.join("history.sqlite");
        let _ = std::fs::remove_file(&path);
        let now = 1_800_000_000;
        let mut h = History::default();
        h.record(now, parse("x_total 4\ng 2\n"));
        h.record(now + 60, parse("x_total 6\ng 1\n"));
        let mut file = HistoryFile::open(&path).expect("open");
        file.save(&h.take_changed(), now + 60).expect("save");
        drop(file);
        let file = HistoryFile::open(&path).expect("reopen");
        let mut back = History::default();
        back.restore(file.load(now + 60).expect("load"), now + 60);
        for name in ["x_total", "g"] {
            let a: Vec<_> = h
                .named(name)
                .flat_map(|s| s.points(Resolution::Minute, 0).collect::<Vec<_>>())
                .collect();
            let b: Vec<_> = back
                .named(name)
                .flat_map(|s| s.points(Resolution::Minute, 0).collect::<Vec<_>>())
                .collect();
            assert_eq!(a, b, "{name}");
            assert_eq!(a.len(), 2);
        }
        // Past what is kept, nothing loads.
        assert!(file.load(now + 31 * 86_400).expect("load").is_empty());
        // One process per file.
        let other = HistoryFile::open(&path).expect_err("a second opener");
        assert!(
            other.to_string().contains("in use by another process"),
            "{other}"
        );
        drop(file);
        HistoryFile::open(&path).expect("free again once closed");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
