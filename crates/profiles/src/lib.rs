//! The bundled profiles: policy files for the APIs whose published rate-limit
//! pages and guides tollgate follows, compiled into the binary from
//! `profiles/*.toml`.
//!
//! A config includes one with `profile = "NAME"`, resolved through [`Bundled`].
//! Each file says where its numbers come from in its `[about]` table (name,
//! title, source, notes, assumptions), which the policy parser ignores.

use tollgate_core::ProfileSource;

/// Every bundled profile: the name `profile = "NAME"` uses, and the file's text.
const PROFILES: [(&str, &str); 10] = [
    ("crm", include_str!("../../../profiles/crm.toml")),
    ("gateway", include_str!("../../../profiles/gateway.toml")),
    ("data-api", include_str!("../../../profiles/data-api.toml")),
    ("celigo", include_str!("../../../profiles/celigo.toml")),
    ("hubspot", include_str!("../../../profiles/hubspot.toml")),
    (
        "salesforce",
        include_str!("../../../profiles/salesforce.toml"),
    ),
    ("outreach", include_str!("../../../profiles/outreach.toml")),
    (
        "salesloft",
        include_str!("../../../profiles/salesloft.toml"),
    ),
    ("apollo", include_str!("../../../profiles/apollo.toml")),
    ("linkedin", include_str!("../../../profiles/linkedin.toml")),
];

/// What `tollgate profiles` lists: a profile's `[about]` name, title and source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProfileInfo {
    pub name: String,
    pub title: String,
    pub source: String,
}

/// The text of the bundled profile `name`.
pub fn get(name: &str) -> Option<&'static str> {
    PROFILES
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, text)| *text)
}

/// Every bundled profile, in a fixed order.
pub fn list() -> Vec<ProfileInfo> {
    PROFILES
        .iter()
        .map(|(name, text)| about(name, text))
        .collect()
}

fn about(name: &str, text: &str) -> ProfileInfo {
    let table: toml::Table = toml::from_str(text).unwrap_or_default();
    let about = table.get("about").and_then(|a| a.as_table());
    let field = |key: &str| {
        about
            .and_then(|a| a.get(key))
            .and_then(|v| v.as_str())
            .map(str::to_owned)
    };
    ProfileInfo {
        name: field("name").unwrap_or_else(|| name.to_owned()),
        title: field("title").unwrap_or_default(),
        source: field("source").unwrap_or_default(),
    }
}

/// The bundled profiles as a `ProfileSource` for `tollgate_core::parse`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Bundled;

impl ProfileSource for Bundled {
    fn profile_text(&self, name: &str) -> Option<&str> {
        get(name)
    }

    fn profile_names(&self) -> Vec<String> {
        PROFILES.iter().map(|(n, _)| (*n).to_owned()).collect()
    }
}
