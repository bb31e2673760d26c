//! The `/metrics` endpoint of the exporter, the purger, the PostgreSQL bridge and the write-behind worker.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use prometheus_client::registry::Registry;

/// Renders the metrics text at each scrape.
pub type Render = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = String> + Send>> + Send + Sync>;

pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Binds `addr` (an error if it is taken) and serves `/metrics` until the process ends.
pub async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener, String> {
    tokio::net::TcpListener::bind(addr).await.map_err(|e| format!("cannot listen on {addr}: {e}"))
}

/// Binds `addr` and serves `registry` at `/metrics` in the background (errors logged, as `what`);
/// `before_scrape` runs first at each scrape, to refresh gauges computed on demand.
pub async fn spawn_registry(
    addr: SocketAddr,
    registry: Registry,
    what: &str,
    before_scrape: impl Fn() + Send + Sync + 'static,
) -> Result<(), String> {
    let listener = bind(addr).await?;
    let registry = Arc::new(registry);
    let render: Render = Arc::new(move || {
        before_scrape();
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
        Box::pin(async move { out })
    });
    crate::log(&format!("{what}: metrics on http://{addr}/metrics"));
    tokio::spawn(async move {
        if let Err(e) = serve(listener, render).await {
            crate::log(&e);
        }
    });
    Ok(())
}

pub async fn serve(listener: tokio::net::TcpListener, render: Render) -> Result<(), String> {
    let app = Router::new()
        .route(
            "/metrics",
            get(move || {
                let render = render.clone();
                async move { ([(CONTENT_TYPE, OPENMETRICS)], render().await).into_response() }
            }),
        )
        .route("/", get(|| async { "tiercache: metrics at /metrics\n" }));
    axum::serve(listener, app).await.map_err(|e| format!("metrics server: {e}"))
}
