//! A fleet's metrics history on its Redis, so every node's dashboard shows
//! the fleet: each process writes its own buckets (`tollgate-watch`'s rows)
//! into one hash per resolution and bucket, `{prefix}:history:{res}:{bucket}`,
//! a field per node and series; a page reads the hashes of its range and
//! adds the nodes up. Hashes expire a little after the history stops keeping
//! their bucket.

use super::{redacted, RedisError};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use std::time::Duration;
use tokio::sync::OnceCell;
use tollgate_core::policy::RedisSettings;

/// Separates a field's node, kind and series (none of them holds it).
const SEP: char = '\u{1f}';

/// One bucket of one node's series.
#[derive(Debug, Clone, PartialEq)]
pub struct HistoryRow {
    /// The process that wrote it (host, pid, start).
    pub node: String,
    /// "counter" or "gauge".
    pub kind: String,
    /// `name{labels}`.
    pub series: String,
    /// A counter's increase in the bucket, or a gauge's last value.
    pub value: f64,
}

/// The fleet's history hashes.
#[derive(Debug)]
pub struct FleetHistory {
    client: redis::Client,
    conn: OnceCell<ConnectionManager>,
    /// `{prefix}:history:`
    keys: String,
    url: String,
    timeout: Duration,
}

impl FleetHistory {
    /// The history hashes under `[store]`'s prefix; connects on first use.
    pub fn new(settings: &RedisSettings) -> Result<FleetHistory, RedisError> {
        let url = redacted(&settings.url);
        let client = redis::Client::open(settings.url.as_str())
            .map_err(|e| RedisError::Config(format!("url '{url}' is not usable: {e}")))?;
        Ok(FleetHistory {
            client,
            conn: OnceCell::new(),
            keys: format!("{}:history:", settings.prefix),
            url,
            // A page or a scrape may wait longer than a decision.
            timeout: Duration::from_nanos(settings.timeout).max(Duration::from_secs(2)),
        })
    }

    fn unavailable(&self, reason: String) -> RedisError {
        RedisError::Unavailable {
            url: self.url.clone(),
            reason,
        }
    }

    async fn connection(&self) -> Result<ConnectionManager, RedisError> {
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout))
            .set_number_of_retries(1);
        self.conn
            .get_or_try_init(|| ConnectionManager::new_with_config(self.client.clone(), config))
            .await
            .cloned()
            .map_err(|e| self.unavailable(e.to_string()))
    }

    fn key(&self, resolution: i64, bucket: i64) -> String {
        format!("{}{resolution}:{bucket}", self.keys)
    }

    /// Write `node`'s buckets: (resolution code, bucket, kind, series,
    /// value); each hash lives `keep[resolution code]` past its bucket.
    pub async fn write(
        &self,
        node: &str,
        rows: &[(i64, i64, &str, &str, f64)],
        keep: [Duration; 2],
    ) -> Result<(), RedisError> {
        if rows.is_empty() {
            return Ok(());
        }
        let mut conn = self.connection().await?;
        let mut pipe = redis::pipe();
        for (resolution, bucket, kind, series, value) in rows {
            let key = self.key(*resolution, *bucket);
            let field = format!("{node}{SEP}{kind}{SEP}{series}");
            let life = keep
                .get(*resolution as usize)
                .copied()
                .unwrap_or(keep[0])
                .as_secs() as i64;
            pipe.hset(&key, field, value.to_string())
                .ignore()
                .expire_at(&key, bucket + life)
                .ignore();
        }
        pipe.query_async::<()>(&mut conn)
            .await
            .map_err(|e| self.unavailable(e.to_string()))
    }

    /// Every node's rows of the hashes of `buckets` at `resolution`, bucket
    /// by bucket.
    pub async fn read(
        &self,
        resolution: i64,
        buckets: &[i64],
    ) -> Result<Vec<(i64, HistoryRow)>, RedisError> {
        let mut conn = self.connection().await?;
        let mut pipe = redis::pipe();
        for bucket in buckets {
            pipe.hgetall(self.key(resolution, *bucket));
        }
        let hashes: Vec<Vec<(String, String)>> = pipe
            .query_async(&mut conn)
            .await
            .map_err(|e| self.unavailable(e.to_string()))?;
        let mut out = Vec::new();
        for (bucket, fields) in buckets.iter().zip(hashes) {
            for (field, value) in fields {
                let mut parts = field.splitn(3, SEP);
                let (Some(node), Some(kind), Some(series)) =
                    (parts.next(), parts.next(), parts.next())
                else {
                    continue;
                };
                let Ok(value) = value.parse::<f64>() else {
                    continue;
                };
                out.push((
                    *bucket,
                    HistoryRow {
                        node: node.to_string(),
                        kind: kind.to_string(),
                        series: series.to_string(),
                        value,
                    },
                ));
            }
        }
        Ok(out)
    }
}
