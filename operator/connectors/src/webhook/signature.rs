//! Signature schemes (DESIGN.md, Connector `webhook`), every comparison in
//! constant time:
//!
//! | scheme | the request carries | checked against |
//! |---|---|---|
//! | `hmac-sha256` | `header: <hex>` or `sha256=<hex>` | HMAC-SHA256(secret, raw body) |
//! | `hmac-sha256-timestamped` | `timestampHeader: <unix s>`, `header: <hex>` | HMAC-SHA256(secret, `"<ts>.<raw body>"`), ts within `tolerance` |
//! | `token` | `header: <secret>` | the secret (both hashed, so lengths leak nothing) |
//! | `none` | nothing | nothing |

use std::time::Duration;

use axum::http::{HeaderMap, HeaderName};
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

type HmacSha256 = Hmac<Sha256>;

/// A signature scheme with its secret, prepared once per Connector.
#[derive(Clone)]
pub(crate) enum Verifier {
    None,
    Token {
        header: HeaderName,
        digest: [u8; 32],
    },
    Hmac {
        header: HeaderName,
        /// Keyed once; cloned per request.
        mac: HmacSha256,
    },
    Timestamped {
        header: HeaderName,
        timestamp_header: HeaderName,
        mac: HmacSha256,
        tolerance: Duration,
    },
}

impl std::fmt::Debug for Verifier {
    // The scheme and header names only: key material stays out of every log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Verifier::None => f.write_str("none"),
            Verifier::Token { header, .. } => write!(f, "token({header})"),
            Verifier::Hmac { header, .. } => write!(f, "hmac-sha256({header})"),
            Verifier::Timestamped {
                header,
                timestamp_header,
                tolerance,
                ..
            } => write!(
                f,
                "hmac-sha256-timestamped({header}, {timestamp_header}, {tolerance:?})"
            ),
        }
    }
}

/// Why a request's signature was refused. All of them answer 401.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SignatureError {
    /// A header the scheme needs is absent (or not text).
    Missing(&'static str),
    /// Present, but not the value the secret gives.
    Mismatch,
    /// The timestamp is not unix seconds.
    BadTimestamp,
    /// Signed correctly, but outside the tolerance window: a replay, or a
    /// clock far off.
    Stale,
}

/// Timestamps longer than this are not plausible unix seconds; refusing them
/// early keeps the arithmetic in range.
const MAX_TIMESTAMP_DIGITS: usize = 12;

impl Verifier {
    pub(crate) fn hmac(secret: &[u8]) -> HmacSha256 {
        HmacSha256::new_from_slice(secret).expect("HMAC takes keys of any length")
    }

    pub(crate) fn token_digest(secret: &[u8]) -> [u8; 32] {
        Sha256::digest(secret).into()
    }

    /// The header whose value is itself the secret, which must never reach
    /// CEL (a mapping could copy it into an event).
    pub(crate) fn secret_header(&self) -> Option<&HeaderName> {
        match self {
            Verifier::Token { header, .. } => Some(header),
            _ => None,
        }
    }

    /// Checks `body` as received against the request's headers, at
    /// `now_unix` (seconds).
    pub(crate) fn verify(
        &self,
        headers: &HeaderMap,
        body: &[u8],
        now_unix: i64,
    ) -> Result<(), SignatureError> {
        match self {
            Verifier::None => Ok(()),
            Verifier::Token { header, digest } => {
                let given =
                    header_bytes(headers, header).ok_or(SignatureError::Missing("token"))?;
                let given: [u8; 32] = Sha256::digest(given).into();
                if bool::from(given.ct_eq(digest)) {
                    Ok(())
                } else {
                    Err(SignatureError::Mismatch)
                }
            }
            Verifier::Hmac { header, mac } => {
                let signature = signature(headers, header)?;
                let mut mac = mac.clone();
                mac.update(body);
                mac.verify_slice(&signature)
                    .map_err(|_| SignatureError::Mismatch)
            }
            Verifier::Timestamped {
                header,
                timestamp_header,
                mac,
                tolerance,
            } => {
                let ts_text = header_bytes(headers, timestamp_header)
                    .ok_or(SignatureError::Missing("timestamp"))?;
                if ts_text.is_empty()
                    || ts_text.len() > MAX_TIMESTAMP_DIGITS
                    || !ts_text.iter().all(u8::is_ascii_digit)
                {
                    return Err(SignatureError::BadTimestamp);
                }
                let signature = signature(headers, header)?;
                let mut mac = mac.clone();
                mac.update(ts_text);
                mac.update(b".");
                mac.update(body);
                mac.verify_slice(&signature)
                    .map_err(|_| SignatureError::Mismatch)?;
                // Checked after the MAC, so a replay (genuine, old) and a
                // forgery are told apart in the metrics.
                let ts: i64 = std::str::from_utf8(ts_text)
                    .ok()
                    .and_then(|t| t.parse().ok())
                    .ok_or(SignatureError::BadTimestamp)?;
                if now_unix.abs_diff(ts) > tolerance.as_secs() {
                    return Err(SignatureError::Stale);
                }
                Ok(())
            }
        }
    }
}

/// The first value of `name`, without surrounding whitespace.
fn header_bytes<'a>(headers: &'a HeaderMap, name: &HeaderName) -> Option<&'a [u8]> {
    headers.get(name).map(|v| v.as_bytes().trim_ascii())
}

/// The signature header decoded: lowercase (or uppercase) hex, optionally
/// prefixed `sha256=`.
fn signature(headers: &HeaderMap, name: &HeaderName) -> Result<Vec<u8>, SignatureError> {
    let value = header_bytes(headers, name).ok_or(SignatureError::Missing("signature"))?;
    let hex_text = match value.get(..7) {
        Some(prefix) if prefix.eq_ignore_ascii_case(b"sha256=") => &value[7..],
        _ => value,
    };
    // Any length other than 64 digits cannot match; decode fails or the
    // comparison does, in time independent of the secret.
    hex::decode(hex_text).map_err(|_| SignatureError::Mismatch)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn hex_hmac(secret: &[u8], parts: &[&[u8]]) -> String {
        let mut mac = Verifier::hmac(secret);
        for p in parts {
            mac.update(p);
        }
        hex::encode(mac.finalize().into_bytes())
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn hmac_accepts_plain_and_prefixed_hex_and_refuses_the_rest() {
        let v = Verifier::Hmac {
            header: HeaderName::from_static("x-signature"),
            mac: Verifier::hmac(b"s3cret"),
        };
        let body = br#"{"a":1}"#;
        let good = hex_hmac(b"s3cret", &[body]);
        assert_eq!(
            v.verify(&headers(&[("x-signature", &good)]), body, 0),
            Ok(())
        );
        let prefixed = format!("sha256={good}");
        assert_eq!(
            v.verify(&headers(&[("x-signature", &prefixed)]), body, 0),
            Ok(())
        );
        let upper = good.to_uppercase();
        assert_eq!(
            v.verify(&headers(&[("x-signature", &upper)]), body, 0),
            Ok(())
        );
        let wrong = hex_hmac(b"other", &[body]);
        assert_eq!(
            v.verify(&headers(&[("x-signature", &wrong)]), body, 0),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            v.verify(&headers(&[("x-signature", &good)]), br#"{"a":2}"#, 0),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            v.verify(&headers(&[("x-signature", &good[..10])]), body, 0),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            v.verify(&HeaderMap::new(), body, 0),
            Err(SignatureError::Missing("signature"))
        );
    }

    #[test]
    fn timestamped_signs_timestamp_dot_body_within_the_tolerance() {
        let v = Verifier::Timestamped {
            header: HeaderName::from_static("x-sig"),
            timestamp_header: HeaderName::from_static("x-ts"),
            mac: Verifier::hmac(b"k"),
            tolerance: Duration::from_secs(300),
        };
        let body = b"{}";
        let at = |ts: i64, now: i64| {
            let sig = hex_hmac(b"k", &[ts.to_string().as_bytes(), b".", body]);
            v.verify(
                &headers(&[("x-sig", &sig), ("x-ts", &ts.to_string())]),
                body,
                now,
            )
        };
        assert_eq!(at(1_000_000, 1_000_000), Ok(()));
        assert_eq!(at(1_000_000, 1_000_300), Ok(()));
        assert_eq!(at(1_000_000, 999_700), Ok(()));
        assert_eq!(at(1_000_000, 1_000_301), Err(SignatureError::Stale));
        assert_eq!(at(1_000_000, 999_699), Err(SignatureError::Stale));
        // The body alone, without the timestamp, is not the signed message.
        let body_only = hex_hmac(b"k", &[body]);
        assert_eq!(
            v.verify(
                &headers(&[("x-sig", &body_only), ("x-ts", "1000000")]),
                body,
                1_000_000
            ),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            v.verify(&headers(&[("x-sig", &body_only), ("x-ts", "-5")]), body, 0),
            Err(SignatureError::BadTimestamp)
        );
        assert_eq!(
            v.verify(&headers(&[("x-sig", &body_only)]), body, 0),
            Err(SignatureError::Missing("timestamp"))
        );
    }

    #[test]
    fn token_is_compared_whole() {
        let v = Verifier::Token {
            header: HeaderName::from_static("x-token"),
            digest: Verifier::token_digest(b"t0k3n"),
        };
        assert_eq!(v.verify(&headers(&[("x-token", "t0k3n")]), b"", 0), Ok(()));
        for bad in ["t0k3", "t0k3n2", "T0K3N", ""] {
            assert_eq!(
                v.verify(&headers(&[("x-token", bad)]), b"", 0),
                Err(SignatureError::Mismatch),
                "{bad}"
            );
        }
        assert!(!format!("{v:?}").contains("t0k3n"));
    }
}
