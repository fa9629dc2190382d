//! Where alerts go: the log, and webhooks (generic JSON, or Slack's
//! incoming-webhook shape), each event retried while its receiver fails.

use crate::alerts::{Event, Level};
use bytes::Bytes;
use std::sync::Arc;
use tollgate_http::webhook::{self, Client, Retries};

/// The body a webhook gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// The event as JSON (`alert`, `subject`, `status`, `severity`,
    /// `value`, `threshold`, `at`, `summary`).
    Json,
    /// `{"text": SUMMARY}`, as Slack's (and Mattermost's, Rocket.Chat's)
    /// incoming webhooks take it.
    Slack,
}

/// One receiver of alerts.
#[derive(Clone, PartialEq)]
pub struct Webhook {
    pub url: String,
    pub format: Format,
}

impl std::fmt::Debug for Webhook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL is often a secret (Slack's are): its host only.
        f.debug_struct("Webhook")
            .field("to", &self.shown())
            .field("format", &self.format)
            .finish()
    }
}

impl Webhook {
    /// Its host, without user, path or query (a webhook URL is often a
    /// secret).
    fn host(&self) -> &str {
        self.url
            .split("://")
            .nth(1)
            .and_then(|rest| rest.split(['/', '?', '#']).next())
            .map(|authority| authority.rsplit('@').next().unwrap_or(authority))
            .unwrap_or("?")
    }

    /// How the log names a receiver: its host only.
    pub fn shown(&self) -> String {
        format!("webhook to {}", self.host())
    }

    /// How a shown config writes its URL: `https://host/…`.
    pub fn scheme_and_host(&self) -> String {
        let scheme = self.url.split("://").next().unwrap_or("https");
        format!("{scheme}://{}/…", self.host())
    }

    /// The body for `event`.
    pub fn body(&self, event: &Event) -> Bytes {
        let value = match self.format {
            Format::Json => serde_json::to_value(event).unwrap_or_default(),
            Format::Slack => {
                let mark = match (event.status, event.severity) {
                    ("resolved", _) => ":white_check_mark:",
                    (_, Level::Critical) => ":rotating_light:",
                    _ => ":warning:",
                };
                // Slack reads <...> as links and mentions: the summary
                // (label values may come from clients) is escaped as it asks.
                let summary = event
                    .summary
                    .replace('&', "&amp;")
                    .replace('<', "&lt;")
                    .replace('>', "&gt;");
                serde_json::json!({ "text": format!("{mark} tollgate: {summary}") })
            }
        };
        Bytes::from(value.to_string())
    }
}

/// Sends every event to the log and to each webhook.
#[derive(Clone)]
pub struct Notifier {
    client: Option<Client>,
    webhooks: Arc<Vec<Webhook>>,
    retries: Retries,
}

impl std::fmt::Debug for Notifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Notifier")
            .field("webhooks", &self.webhooks.len())
            .finish_non_exhaustive()
    }
}

impl Notifier {
    pub fn new(webhooks: Vec<Webhook>, retries: Retries) -> Result<Notifier, String> {
        let client = if webhooks.is_empty() {
            None
        } else {
            Some(webhook::client(retries.timeout)?)
        };
        Ok(Notifier {
            client,
            webhooks: Arc::new(webhooks),
            retries,
        })
    }

    /// The same receivers, retried so.
    pub fn with_retries(self, retries: Retries) -> Result<Notifier, String> {
        Notifier::new(self.webhooks.as_ref().clone(), retries)
    }

    /// Log `events` and deliver each to every webhook (on tasks of their
    /// own: a slow receiver delays nothing else).
    pub fn send(&self, events: &[Event]) {
        for event in events {
            match (event.status, event.severity) {
                ("resolved", _) => {
                    tracing::info!(alert = %event.alert, subject = %event.subject, "{}", event.summary)
                }
                (_, Level::Critical) => {
                    tracing::error!(alert = %event.alert, subject = %event.subject, "{}", event.summary)
                }
                _ => {
                    tracing::warn!(alert = %event.alert, subject = %event.subject, "{}", event.summary)
                }
            }
            let Some(client) = &self.client else { continue };
            if tokio::runtime::Handle::try_current().is_err() {
                continue;
            }
            for hook in self.webhooks.iter() {
                let (client, hook, body, retries) =
                    (client.clone(), hook.clone(), hook.body(event), self.retries);
                let alert = event.alert.clone();
                tokio::spawn(async move {
                    if let Err(e) = webhook::post_json(&client, &hook.url, body, &[], retries).await
                    {
                        tracing::warn!(alert = %alert, "{} undelivered after {} attempts: {e}", hook.shown(), retries.attempts);
                    }
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_webhook_is_named_by_its_host_alone() {
        let hook = Webhook {
            url: "https://user:pw@hooks.slack.com/services/T000/B000/SECRET?x=1".into(),
            format: Format::Slack,
        };
        assert_eq!(hook.shown(), "webhook to hooks.slack.com");
    }
}
