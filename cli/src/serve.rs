//! The `/metrics` endpoint of the exporter and of the purger.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

/// Renders the metrics text at each scrape.
pub type Render = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = String> + Send>> + Send + Sync>;

pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Binds `addr` (an error if it is taken) and serves `/metrics` until the process ends.
pub async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener, String> {
    tokio::net::TcpListener::bind(addr).await.map_err(|e| format!("cannot listen on {addr}: {e}"))
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
