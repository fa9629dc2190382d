//! What a call to a vendor may not carry, whoever asks for it (a job line,
//! a live request through the proxy): the same rule for both.

/// Why `method` is never sent to a vendor, if it is not: a TRACE (or IIS's
/// TRACK) is echoed back with the credentials tollgate adds, and a CONNECT
/// opens a tunnel rather than making a call.
pub fn unsent_method(method: &str) -> Option<&'static str> {
    match method.to_ascii_uppercase().as_str() {
        "TRACE" | "TRACK" => {
            Some("it is echoed back with the vendor key tollgate adds, so it is never sent")
        }
        "CONNECT" => Some("it opens a tunnel rather than making a call"),
        _ => None,
    }
}

/// Whether `name` (lower case) frames the request or names its host:
/// tollgate sets these itself (from the body and the upstream's base URL),
/// so a job's own would send something other than what it says, or to
/// another host.
pub fn framing_header(name: &str) -> bool {
    matches!(
        name,
        "host"
            | "content-length"
            | "transfer-encoding"
            | "connection"
            | "keep-alive"
            | "proxy-connection"
            | "te"
            | "trailer"
            | "upgrade"
            | "expect"
    )
}

#[cfg(test)]
mod tests {
    use super::{framing_header, unsent_method};

    #[test]
    fn what_is_never_sent() {
        for m in ["TRACE", "trace", "TRACK", "CONNECT"] {
            assert!(unsent_method(m).is_some(), "{m}");
        }
        for m in ["GET", "POST", "PATCH", "DELETE", "PROPFIND"] {
            assert!(unsent_method(m).is_none(), "{m}");
        }
        assert!(framing_header("host") && framing_header("content-length"));
        assert!(!framing_header("authorization") && !framing_header("x-request-id"));
    }
}
