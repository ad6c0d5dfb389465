//! The App's key pair and GitHub's checks of an App JWT.

use std::sync::OnceLock;

use axum::http::HeaderMap;
use jsonwebtoken::{Algorithm, Validation};
use serde_json::{json, Value};

use super::{now_s, GhState};

/// An RSA key pair generated once per test binary: (private PEM, public PEM).
pub fn app_key() -> &'static (String, String) {
    static KEY: OnceLock<(String, String)> = OnceLock::new();
    KEY.get_or_init(|| {
        use rsa::pkcs1::{EncodeRsaPrivateKey, EncodeRsaPublicKey};
        let private = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048).unwrap();
        let public = rsa::RsaPublicKey::from(&private);
        (
            private
                .to_pkcs1_pem(rsa::pkcs1::LineEnding::LF)
                .unwrap()
                .to_string(),
            public.to_pkcs1_pem(rsa::pkcs1::LineEnding::LF).unwrap(),
        )
    })
}

/// Verifies an App JWT the way GitHub does: RS256 signed by the App's key, `iss` = App id,
/// `iat` not in the future, `exp` at most 10 minutes ahead.
pub(super) fn verify_app_jwt(st: &GhState, headers: &HeaderMap) -> Result<(), String> {
    let token = bearer(headers).ok_or("no bearer token")?;
    let mut validation = Validation::new(Algorithm::RS256);
    // `iss` is checked below: GitHub takes it as a number, which jsonwebtoken's own check
    // (strings only) would call missing.
    validation.set_required_spec_claims(&["exp", "iat"]);
    validation.leeway = 0;
    let claims = jsonwebtoken::decode::<Value>(token, &st.decoding, &validation)
        .map_err(|e| format!("JWT rejected: {e}"))?
        .claims;
    let iss_ok = claims["iss"] == json!(st.app_id) || claims["iss"] == json!(st.app_id.to_string());
    let now = now_s() as i64;
    let (iat, exp) = (
        claims["iat"].as_i64().unwrap_or(i64::MAX),
        claims["exp"].as_i64().unwrap_or(0),
    );
    if !iss_ok {
        return Err(format!("iss {} is not app {}", claims["iss"], st.app_id));
    }
    if iat > now || exp > now + 600 || exp <= iat {
        return Err(format!("bad iat/exp {iat}/{exp} at {now}"));
    }
    Ok(())
}

pub(super) fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get("authorization")?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
}

/// Stand-in self-check: a JWT signed with another key or claims out of bounds is refused.
pub fn forged_jwt_rejected(st: &GhState) {
    use jsonwebtoken::{encode, EncodingKey, Header};
    let key = EncodingKey::from_rsa_pem(app_key().0.as_bytes()).unwrap();
    let now = now_s();
    let good = encode(
        &Header::new(Algorithm::RS256),
        &json!({"iss": st.app_id, "iat": now - 60, "exp": now + 540}),
        &key,
    )
    .unwrap();
    let hdr = |t: &str| {
        let mut h = HeaderMap::new();
        h.insert("authorization", format!("Bearer {t}").parse().unwrap());
        h
    };
    assert_eq!(verify_app_jwt(st, &hdr(&good)), Ok(()));
    // Flip a character of the signature.
    let mut forged = good.clone().into_bytes();
    let last = forged.len() - 2;
    forged[last] = if forged[last] == b'A' { b'B' } else { b'A' };
    assert!(verify_app_jwt(st, &hdr(std::str::from_utf8(&forged).unwrap())).is_err());
    let too_long = encode(
        &Header::new(Algorithm::RS256),
        &json!({"iss": st.app_id, "iat": now - 60, "exp": now + 3600}),
        &key,
    )
    .unwrap();
    assert!(verify_app_jwt(st, &hdr(&too_long)).is_err());
    let other_app = encode(
        &Header::new(Algorithm::RS256),
        &json!({"iss": st.app_id + 1, "iat": now - 60, "exp": now + 540}),
        &key,
    )
    .unwrap();
    assert!(verify_app_jwt(st, &hdr(&other_app)).is_err());
}
