//! The admin API client used by the CLI.

use std::path::{Path, PathBuf};

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper::Request;
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use tokio::net::UnixStream;

use super::ErrorView;

/// Responses larger than this are refused.
const MAX_RESPONSE: usize = 16 * 1024 * 1024;

/// Why a call to the daemon failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "no drift daemon is answering on {socket}; is `drift run` running? \
         Point at it with --socket PATH or --config FILE"
    )]
    NotRunning {
        socket: PathBuf,
        source: std::io::Error,
    },
    #[error("the daemon answered {status}: {message}")]
    Status { status: u16, message: String },
    #[error("talking to the daemon: {0}")]
    Http(String),
    // Not `#[from]`: a source would be printed a second time.
    #[error("the daemon's answer does not parse: {0}")]
    Decode(serde_json::Error),
}

impl From<serde_json::Error> for ClientError {
    fn from(e: serde_json::Error) -> Self {
        ClientError::Decode(e)
    }
}

async fn call(socket: &Path, req: Request<Full<Bytes>>) -> Result<(u16, Bytes), ClientError> {
    let stream = UnixStream::connect(socket)
        .await
        .map_err(|source| ClientError::NotRunning {
            socket: socket.to_owned(),
            source,
        })?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| ClientError::Http(e.to_string()))?;
    let conn = tokio::spawn(conn);
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| ClientError::Http(e.to_string()))?;
    let status = resp.status().as_u16();
    let body = Limited::new(resp.into_body(), MAX_RESPONSE)
        .collect()
        .await
        .map_err(|e| ClientError::Http(e.to_string()))?
        .to_bytes();
    conn.abort();
    Ok((status, body))
}

fn check(status: u16, body: &Bytes) -> Result<(), ClientError> {
    if (200..300).contains(&status) {
        return Ok(());
    }
    let message = serde_json::from_slice::<ErrorView>(body)
        .map(|e| e.error)
        .unwrap_or_else(|_| String::from_utf8_lossy(body).into_owned());
    Err(ClientError::Status { status, message })
}

/// One request with an optional binary body; the answer parsed as `T`.
async fn request<T: DeserializeOwned>(
    socket: &Path,
    method: hyper::Method,
    path: &str,
    body: Vec<u8>,
) -> Result<T, ClientError> {
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "drift")
        .header("content-type", "application/octet-stream")
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| ClientError::Http(e.to_string()))?;
    let (status, body) = call(socket, req).await?;
    check(status, &body)?;
    Ok(serde_json::from_slice(&body)?)
}

/// `GET path`, parsed as `T`.
pub async fn get<T: DeserializeOwned>(socket: &Path, path: &str) -> Result<T, ClientError> {
    request(socket, hyper::Method::GET, path, Vec::new()).await
}

/// `DELETE path`, parsed as `T`.
pub async fn delete<T: DeserializeOwned>(socket: &Path, path: &str) -> Result<T, ClientError> {
    request(socket, hyper::Method::DELETE, path, Vec::new()).await
}

/// `POST path` with a binary body, parsed as `T`.
pub async fn post<T: DeserializeOwned>(
    socket: &Path,
    path: &str,
    bytes: Vec<u8>,
) -> Result<T, ClientError> {
    request(socket, hyper::Method::POST, path, bytes).await
}

/// `GET path`, the body as text (e.g. `/metrics`).
pub async fn get_text(socket: &Path, path: &str) -> Result<String, ClientError> {
    let body = get_bytes(socket, path).await?;
    String::from_utf8(body.to_vec()).map_err(|e| ClientError::Http(e.to_string()))
}

/// `GET path`, the body as bytes (for binary answers such as witnessed audit heads).
pub async fn get_bytes(socket: &Path, path: &str) -> Result<Bytes, ClientError> {
    let req = Request::builder()
        .method(hyper::Method::GET)
        .uri(path)
        .header("host", "drift")
        .body(Full::new(Bytes::new()))
        .map_err(|e| ClientError::Http(e.to_string()))?;
    let (status, body) = call(socket, req).await?;
    check(status, &body)?;
    Ok(body)
}
