//! `metrics.listen`: `/metrics` (Prometheus), `/healthz` (progress, [`super::health`]) and
//! `/readyz` (every table started), over HTTP/1.1 with hyper.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use crate::error::{ConfigError, Error};

/// The content type of `/metrics` (prometheus-client writes OpenMetrics text).
const METRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Binds `listen` (a bind failure is a config error naming `metrics.listen`) and serves
/// until `cancel` fires. Returns the bound address (port 0 picks one).
pub async fn serve(listen: SocketAddr, cancel: CancellationToken) -> Result<SocketAddr, Error> {
    let listener = TcpListener::bind(listen).await.map_err(|e| {
        Error::Config(ConfigError::Invalid {
            key: "metrics.listen".into(),
            message: format!(
                "cannot listen on {listen}: {e} (another process on that port? choose another port or remove metrics.listen)"
            ),
        })
    })?;
    let bound = listener.local_addr().unwrap_or(listen);
    info!(listen = %bound, "serving /metrics, /healthz and /readyz");
    tokio::spawn(async move {
        loop {
            let (stream, peer) = tokio::select! {
                _ = cancel.cancelled() => return,
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        debug!(error = %e, "metrics accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(|r| async move { Ok::<_, Infallible>(answer(&r)) });
                if let Err(e) = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await
                {
                    debug!(peer = %peer, error = %e, "metrics connection ended");
                }
            });
        }
    });
    Ok(bound)
}

fn answer(r: &Request<Incoming>) -> Response<Full<Bytes>> {
    let t = super::get();
    let reply = |status: StatusCode, content_type: &str, body: String| {
        Response::builder()
            .status(status)
            .header("content-type", content_type)
            .body(Full::new(Bytes::from(body)))
            .expect("a valid response")
    };
    if r.method() != Method::GET && r.method() != Method::HEAD {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "GET only\n".into(),
        );
    }
    match r.uri().path() {
        "/metrics" => reply(StatusCode::OK, METRICS_CONTENT_TYPE, t.encode()),
        "/healthz" => {
            let h = t.health();
            let status = if h.healthy {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            reply(status, "application/json", h.body() + "\n")
        }
        "/readyz" => {
            let (started, tables) = t.tables_started();
            let ready = t.ready();
            let body = serde_json::json!({
                "status": if ready { "ready" } else { "starting" },
                "tables_started": started,
                "tables": tables,
            });
            let status = if ready {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            reply(status, "application/json", body.to_string() + "\n")
        }
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: /metrics, /healthz, /readyz\n".into(),
        ),
    }
}

/// GETs `url` (`http://host:port/path`), returning the status and body: `status
/// --metrics-url`, and the tests.
pub async fn get(url: &str) -> Result<(u16, String), String> {
    use http_body_util::BodyExt;
    let uri: hyper::Uri = url.parse().map_err(|e| format!("{url}: {e}"))?;
    if uri.scheme_str() != Some("http") {
        return Err(format!("{url}: only http:// URLs are supported"));
    }
    let host = uri.host().ok_or_else(|| format!("{url}: no host"))?;
    let port = uri.port_u16().unwrap_or(80);
    let stream = tokio::net::TcpStream::connect((host, port))
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    tokio::spawn(conn);
    let request = Request::get(uri.path())
        .header("host", format!("{host}:{port}"))
        .body(http_body_util::Empty::<Bytes>::new())
        .map_err(|e| format!("{url}: {e}"))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    let status = response.status().as_u16();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("{url}: {e}"))?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn serves_metrics_health_and_readiness() {
        let cancel = CancellationToken::new();
        let addr = serve("127.0.0.1:0".parse().unwrap(), cancel.clone())
            .await
            .unwrap();
        let base = format!("http://{addr}");
        let (status, body) = get(&format!("{base}/metrics")).await.unwrap();
        assert_eq!(status, 200);
        assert!(body.contains("dynamodb_cdc_build_info"), "{body}");
        assert!(body.ends_with("# EOF\n"), "{body}");
        let (status, body) = get(&format!("{base}/healthz")).await.unwrap();
        assert!(status == 200 || status == 503, "{status}");
        assert!(body.contains("\"status\""), "{body}");
        let (status, _) = get(&format!("{base}/readyz")).await.unwrap();
        assert!(status == 200 || status == 503, "{status}");
        let (status, _) = get(&format!("{base}/nothing")).await.unwrap();
        assert_eq!(status, 404);

        // The port is taken: a config error naming the key.
        let e = serve(addr, CancellationToken::new()).await.unwrap_err();
        assert!(e.to_string().contains("metrics.listen"), "{e}");
        cancel.cancel();
    }
}
