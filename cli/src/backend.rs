//! Where the purger sends purges: Varnish (vmod xkey, through the shipped VCL), Fastly and Cloudflare.
//!
//! Every backend takes a batch of edge keys (see `tiercache_client::edge`), and a *full purge*: the
//! namespace key when one is configured (every page of the site carries it), else the backend's
//! purge-everything.

use std::time::Duration;

/// One purge target.
#[derive(Clone, Debug)]
pub enum Backend {
    /// `PURGE /` with `xkey-purge: k1 k2` (or `xkey-purge-all: 1`) to every listed Varnish.
    Varnish { urls: Vec<String> },
    /// `POST {api}/service/{service_id}/purge` with `Surrogate-Key: k1 k2` and `Fastly-Key: token`;
    /// `POST {api}/service/{service_id}/purge_all` for a full purge without a namespace key.
    Fastly { api: String, service_id: String, token: String, soft: bool },
    /// `POST {api}/zones/{zone_id}/purge_cache` with `{"tags": [...]}` (or `{"purge_everything": true}`)
    /// and `Authorization: Bearer token`. `api` includes `/client/v4`.
    Cloudflare { api: String, zone_id: String, token: String },
}

/// A purge that did not go through (the purger retries it).
#[derive(Debug)]
pub struct PurgeError(pub String);

impl std::fmt::Display for PurgeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for PurgeError {}

impl Backend {
    pub fn name(&self) -> &'static str {
        match self {
            Backend::Varnish { .. } => "varnish",
            Backend::Fastly { .. } => "fastly",
            Backend::Cloudflare { .. } => "cloudflare",
        }
    }

    /// The most keys one request carries, and the most bytes of keys (separators included).
    pub fn batch_limits(&self) -> (usize, usize) {
        match self {
            // One request header; Varnish's default http_req_hdr_len is 8 KiB.
            Backend::Varnish { .. } => (512, 7_900),
            // Fastly's documented batch: up to 256 keys.
            Backend::Fastly { .. } => (256, 16_000),
            // Cloudflare: at most 100 operations (tags) per purge request.
            Backend::Cloudflare { .. } => (100, 1 << 20),
        }
    }

    /// Purges pages carrying any of `keys`.
    pub async fn purge(&self, http: &reqwest::Client, keys: &[String]) -> Result<(), PurgeError> {
        match self {
            Backend::Varnish { urls } => {
                for url in urls {
                    let req = http.request(purge_method(), url.as_str()).header("xkey-purge", keys.join(" "));
                    check(url, req.send().await).await?;
                }
                Ok(())
            }
            Backend::Fastly { api, service_id, token, soft } => {
                let url = format!("{}/service/{}/purge", api.trim_end_matches('/'), service_id);
                let mut req = http
                    .post(&url)
                    .header("Fastly-Key", token.as_str())
                    .header("Surrogate-Key", keys.join(" "))
                    .header("Accept", "application/json");
                if *soft {
                    req = req.header("Fastly-Soft-Purge", "1");
                }
                check(&url, req.send().await).await.map(drop)
            }
            Backend::Cloudflare { api, zone_id, token } => {
                let url = format!("{}/zones/{}/purge_cache", api.trim_end_matches('/'), zone_id);
                let req = http.post(&url).bearer_auth(token).json(&serde_json::json!({ "tags": keys }));
                cloudflare_check(&url, req.send().await).await
            }
        }
    }

    /// Purges the whole namespace: `namespace_key` when given, else everything the backend caches.
    pub async fn purge_all(&self, http: &reqwest::Client, namespace_key: Option<&str>) -> Result<(), PurgeError> {
        if let Some(k) = namespace_key {
            return self.purge(http, &[k.to_string()]).await;
        }
        match self {
            Backend::Varnish { urls } => {
                for url in urls {
                    let req = http.request(purge_method(), url.as_str()).header("xkey-purge-all", "1");
                    check(url, req.send().await).await?;
                }
                Ok(())
            }
            Backend::Fastly { api, service_id, token, .. } => {
                let url = format!("{}/service/{}/purge_all", api.trim_end_matches('/'), service_id);
                let req = http.post(&url).header("Fastly-Key", token.as_str()).header("Accept", "application/json");
                check(&url, req.send().await).await.map(drop)
            }
            Backend::Cloudflare { api, zone_id, token } => {
                let url = format!("{}/zones/{}/purge_cache", api.trim_end_matches('/'), zone_id);
                let req = http.post(&url).bearer_auth(token).json(&serde_json::json!({ "purge_everything": true }));
                cloudflare_check(&url, req.send().await).await
            }
        }
    }
}

fn purge_method() -> reqwest::Method {
    // "PURGE" is a valid token, so this cannot fail; GET would be a safe but useless fallback.
    reqwest::Method::from_bytes(b"PURGE").unwrap_or(reqwest::Method::GET)
}

async fn check(url: &str, r: Result<reqwest::Response, reqwest::Error>) -> Result<String, PurgeError> {
    let resp = r.map_err(|e| PurgeError(format!("{url}: {e}")))?;
    let status = resp.status();
    let body = resp.text().await.unwrap_or_default();
    if !status.is_success() {
        return Err(PurgeError(format!("{url}: HTTP {status}: {}", snippet(&body))));
    }
    Ok(body)
}

async fn cloudflare_check(url: &str, r: Result<reqwest::Response, reqwest::Error>) -> Result<(), PurgeError> {
    let body = check(url, r).await?;
    let v: serde_json::Value =
        serde_json::from_str(&body).map_err(|e| PurgeError(format!("{url}: not JSON ({e}): {}", snippet(&body))))?;
    if v.get("success").and_then(|s| s.as_bool()) == Some(true) {
        Ok(())
    } else {
        Err(PurgeError(format!("{url}: success is not true: {}", snippet(&body))))
    }
}

fn snippet(s: &str) -> String {
    let s = s.trim();
    match s.char_indices().nth(200) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s.to_string(),
    }
}

/// The HTTP client the backends share.
pub fn http_client(timeout: Duration) -> Result<reqwest::Client, PurgeError> {
    reqwest::Client::builder()
        .timeout(timeout)
        .user_agent(concat!("tiercache-purge/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| PurgeError(format!("HTTP client: {e}")))
}
