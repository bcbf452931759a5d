//! HTTP plumbing shared by the Hub client ([`crate::hub`]) and the server client
//! ([`crate::backend::remote`]): which transport errors are worth another attempt, how long to
//! wait before it, and a bearer token that only ever goes to the origin it was given for.

use std::io::ErrorKind;
use std::time::Duration;

use ureq::RequestBuilder;

/// Whether a transport error may pass on another attempt: a timeout, a protocol error or a
/// connection cut mid-way. Not a refused connection or a name that does not resolve, which
/// another attempt would only repeat.
pub fn is_retryable(e: &ureq::Error) -> bool {
    match e {
        ureq::Error::Timeout(_) | ureq::Error::Protocol(_) => true,
        ureq::Error::Io(io) => matches!(
            io.kind(),
            ErrorKind::ConnectionReset
                | ErrorKind::ConnectionAborted
                | ErrorKind::UnexpectedEof
                | ErrorKind::BrokenPipe
                | ErrorKind::TimedOut
                | ErrorKind::Interrupted
        ),
        _ => false,
    }
}

/// Whether `e` says a server cannot be reached at all (the connection refused, or no such
/// host), as opposed to a failure of one request.
pub fn is_unreachable(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        cause.downcast_ref::<ureq::Error>().is_some_and(|u| match u {
            ureq::Error::HostNotFound | ureq::Error::ConnectionFailed => true,
            ureq::Error::Io(io) => io.kind() == ErrorKind::ConnectionRefused,
            _ => false,
        })
    })
}

/// The wait before attempt `failures + 1`: `base`, doubling with each failure, at most 16 ×
/// `base`.
pub fn backoff(base: Duration, failures: u32) -> Duration {
    base * 2u32.saturating_pow(failures.saturating_sub(1).min(4))
}

/// The scheme, host and port of `url` (`https://host:port`), as compared for [`bearer`].
pub fn origin(url: &str) -> &str {
    let after_scheme = url.find("://").map_or(0, |i| i + 3);
    match url[after_scheme..].find('/') {
        Some(i) => &url[..after_scheme + i],
        None => url,
    }
}

/// Adds `Authorization: Bearer TOKEN` to a request for `url` only when `url` has the origin
/// the token was given for (`owner`): a redirect target, a CDN or another host never sees it.
pub fn bearer<B>(
    request: RequestBuilder<B>,
    token: Option<&str>,
    url: &str,
    owner: &str,
) -> RequestBuilder<B> {
    match token {
        Some(token) if origin(url) == origin(owner) => {
            request.header("Authorization", format!("Bearer {token}"))
        }
        _ => request,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_goes_only_to_its_own_origin() {
        let agent = ureq::Agent::new_with_defaults();
        let has_auth = |url: &str, owner: &str| {
            let request = bearer(agent.get(url), Some("k"), url, owner);
            request.headers_ref().is_some_and(|h| h.contains_key("authorization"))
        };
        assert!(has_auth("https://hf.co/api/models/x", "https://hf.co"));
        assert!(has_auth("http://127.0.0.1:8080/v1/models", "http://127.0.0.1:8080/v1"));
        assert!(!has_auth("https://cdn.example/file", "https://hf.co"));
        assert!(!has_auth("http://127.0.0.1:8081/v1/models", "http://127.0.0.1:8080/v1"));
        assert!(!has_auth("https://hf.co.evil.example/x", "https://hf.co"));
    }

    #[test]
    fn backoff_doubles_and_stops_doubling() {
        let base = Duration::from_millis(100);
        let waits: Vec<u128> = (1..=7).map(|n| backoff(base, n).as_millis()).collect();
        assert_eq!(waits, [100, 200, 400, 800, 1600, 1600, 1600]);
    }
}
