//! An axum middleware that tags responses for the edge with the tags of the cache entries they were
//! built from, so that `TIERCACHE.INVALIDATE` (through `tiercache purge`) purges the pages too.
//!
//! Handlers put an `EdgeTags` extension on their response; the middleware turns it, plus the
//! namespace key, into the CDN's header (`Surrogate-Key`, `Cache-Tag` or `xkey`, see
//! `tiercache_client::edge`), and makes a response whose tags do not fit in that header uncacheable at
//! the edge instead of cutting the header.
//!
//! ```sh
//! scripts/serve &                                  # redis-server with the module on 6379
//! cargo run -p tiercache-cli --example axum_edge_tags -- 127.0.0.1:3000 varnish
//! curl -i http://127.0.0.1:3000/users/42           # xkey: user:42 team:7 ns:example:v1
//! redis-cli TIERCACHE.INVALIDATE user:42           # tiercache purge ... purges the page at the edge
//! ```

use std::time::Duration;

use axum::extract::{Path, Request, State};
use axum::http::header::{HeaderName, HeaderValue, CACHE_CONTROL};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Router};
use tiercache_client::edge::{self, Cdn};
use tiercache_client::{Opts, TierCache};

/// The tags of what a response was built from (set by handlers, read by the middleware).
#[derive(Clone, Debug, Default)]
struct EdgeTags(Vec<String>);

#[derive(Clone)]
struct AppState {
    cache: TierCache,
    cdn: Cdn,
    /// Every page carries it: `tiercache purge --namespace-key` purges it on a full purge.
    namespace_key: String,
}

/// The middleware: `EdgeTags` extension → CDN header.
async fn edge_tags(State(st): State<AppState>, req: Request, next: Next) -> Response {
    let mut resp = next.run(req).await;
    let Some(EdgeTags(tags)) = resp.extensions_mut().remove::<EdgeTags>() else {
        return resp;
    };
    let all = tags.iter().map(String::as_bytes).chain(std::iter::once(st.namespace_key.as_bytes()));
    let header = edge::header_value(st.cdn, all)
        .map_err(|e| e.to_string())
        .and_then(|v| HeaderValue::from_str(&v).map_err(|e| e.to_string()));
    match header {
        Ok(v) => {
            resp.headers_mut().insert(HeaderName::from_static(header_key(st.cdn)), v);
        }
        Err(e) => {
            // Untagged at the edge would mean never purged: do not let the edge keep it.
            eprintln!("edge tags dropped, response made uncacheable: {e}");
            resp.headers_mut().insert(CACHE_CONTROL, HeaderValue::from_static("private, no-store"));
        }
    }
    resp
}

/// `HeaderName::from_static` wants lower case.
fn header_key(cdn: Cdn) -> &'static str {
    match cdn {
        Cdn::Fastly => "surrogate-key",
        Cdn::Cloudflare => "cache-tag",
        Cdn::Varnish => "xkey",
    }
}

/// A page built from one cached value: its tags go to the edge as they went to Redis.
async fn user(State(st): State<AppState>, Path(id): Path<u64>) -> Response {
    let tags = vec![format!("user:{id}"), "team:7".to_string()];
    let opts = tags.iter().fold(Opts::default().ttl(Duration::from_secs(300)), |o, t| o.tag(t.clone()));
    let loaded = st
        .cache
        .get_or_load(&format!("user:{id}"), &opts, move || async move {
            // The database query would go here.
            Ok::<_, std::io::Error>(format!("user {id}, loaded at {:?}", std::time::SystemTime::now()))
        })
        .await;
    match loaded {
        Ok(body) => ([(CACHE_CONTROL, "public, s-maxage=3600")], Extension(EdgeTags(tags)), body).into_response(),
        Err(e) => (axum::http::StatusCode::SERVICE_UNAVAILABLE, e.to_string()).into_response(),
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let listen = args.next().unwrap_or_else(|| "127.0.0.1:3000".into());
    let cdn = match args.next().as_deref() {
        Some("fastly") => Cdn::Fastly,
        Some("cloudflare") => Cdn::Cloudflare,
        _ => Cdn::Varnish,
    };
    let redis = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/".into());
    let cache = TierCache::builder(redis).namespace("example").build().await?;
    let st = AppState { cache, cdn, namespace_key: "ns:example:v1".into() };
    let app =
        Router::new().route("/users/{id}", get(user)).layer(middleware::from_fn_with_state(st.clone(), edge_tags)).with_state(st);
    let listener = tokio::net::TcpListener::bind(&listen).await?;
    eprintln!("listening on http://{listen} ({} header)", cdn.header_name());
    axum::serve(listener, app).await?;
    Ok(())
}
