//! A fleet's shared pauses: when one process gets a 429 from an upstream,
//! the whole upstream pauses in every process pointed at the same Redis.
//! The process that got it publishes until when (in the fleet's clock, Unix
//! nanoseconds) on the upstream's channel; every process subscribed pauses
//! too. Pub/sub costs nothing per request: only 429s travel. The latest
//! pause is also kept in a key that expires when it ends, so a process
//! that starts (or subscribes again) during a pause pauses as well.

use super::{redacted, RedisError};
use futures_util::StreamExt;
use std::time::Duration;
use tollgate_core::policy::RedisSettings;
use tollgate_core::Nanos;

/// Wait before subscribing again after the connection was lost.
const RESUBSCRIBE_AFTER: Duration = Duration::from_secs(1);

/// Keep the later of the stored pause and this one (until its end), then
/// tell the subscribers. KEYS[1] the stored pause; ARGV: until (ns), the
/// same in ms, the channel.
const PUBLISH_PAUSE: &str = r#"
local stored = tonumber(redis.call('GET', KEYS[1]) or '0')
if tonumber(ARGV[1]) > stored then
  redis.call('SET', KEYS[1], ARGV[1])
  redis.call('PEXPIREAT', KEYS[1], ARGV[2])
end
return redis.call('PUBLISH', ARGV[3], ARGV[1])
"#;

/// One upstream's pause channel on the fleet's Redis.
#[derive(Debug, Clone)]
pub struct Pauses {
    client: redis::Client,
    channel: String,
    /// The latest pause, kept until it ends.
    stored: String,
    url: String,
}

impl Pauses {
    /// The pause channel of `namespace` ("upstream:NAME") under `[store]`.
    pub fn new(settings: &RedisSettings, namespace: &str) -> Result<Pauses, RedisError> {
        let url = redacted(&settings.url);
        let client = redis::Client::open(settings.url.as_str())
            .map_err(|e| RedisError::Config(format!("url '{url}' is not usable: {e}")))?;
        let channel = format!("{}:pause:{namespace}", settings.prefix);
        Ok(Pauses {
            client,
            stored: format!("{channel}:until"),
            channel,
            url,
        })
    }

    /// Tell the fleet: pause until `until`. A failure is logged (the other
    /// processes then meet the vendor's 429 themselves).
    pub async fn publish(&self, until: Nanos) {
        let sent = async {
            let mut conn = self.client.get_multiplexed_async_connection().await?;
            redis::Script::new(PUBLISH_PAUSE)
                .key(&self.stored)
                .arg(until)
                .arg(until.div_ceil(1_000_000))
                .arg(&self.channel)
                .invoke_async::<i64>(&mut conn)
                .await
        };
        if let Err(e) = sent.await {
            tracing::warn!(store = %self.url, "could not tell the fleet of a pause: {e}");
        }
    }

    /// Hand every pause the fleet publishes to `on_pause`, until it returns
    /// false (its line is gone); subscribes again when the connection drops.
    pub async fn listen(&self, on_pause: impl Fn(Nanos) -> bool) {
        loop {
            let subscribed = async {
                let mut pubsub = self.client.get_async_pubsub().await?;
                pubsub.subscribe(&self.channel).await?;
                // A pause published before this subscription and not over yet.
                let mut conn = self.client.get_multiplexed_async_connection().await?;
                let stored: Option<u64> = redis::cmd("GET")
                    .arg(&self.stored)
                    .query_async(&mut conn)
                    .await?;
                if let Some(until) = stored {
                    if !on_pause(until) {
                        return Ok(false);
                    }
                }
                let mut messages = pubsub.on_message();
                while let Some(message) = messages.next().await {
                    let Ok(until) = message.get_payload::<u64>() else {
                        continue;
                    };
                    if !on_pause(until) {
                        return Ok::<bool, redis::RedisError>(false);
                    }
                }
                Ok(true)
            };
            match subscribed.await {
                Ok(false) => return,
                Ok(true) => {}
                Err(e) => {
                    tracing::warn!(store = %self.url, "fleet pauses: subscription lost ({e}); subscribing again")
                }
            }
            tokio::time::sleep(RESUBSCRIBE_AFTER).await;
        }
    }
}
