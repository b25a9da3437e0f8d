//! Request bodies and error answers of the node API: every body is size-limited and
//! decoded strictly, and every failure is an [`ApiError`] JSON body that names the problem.

use axum::extract::{FromRequest, Request};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use hapair_crds::nodeapi::ApiError;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde::de::DeserializeOwned;

/// Largest request body accepted. Reports of a node with many groups are the largest
/// bodies and stay far below this.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// A refused request: status code and a message for the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiFailure {
    pub status: StatusCode,
    pub message: String,
    /// For 429: seconds until the client may retry.
    pub retry_after: Option<u64>,
}

impl ApiFailure {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiFailure { status, message: message.into(), retry_after: None }
    }
    pub fn unauthorized(message: impl Into<String>) -> Self {
        ApiFailure::new(StatusCode::UNAUTHORIZED, message)
    }
    pub fn forbidden(message: impl Into<String>) -> Self {
        ApiFailure::new(StatusCode::FORBIDDEN, message)
    }
    pub fn bad_request(message: impl Into<String>) -> Self {
        ApiFailure::new(StatusCode::BAD_REQUEST, message)
    }
}

impl IntoResponse for ApiFailure {
    fn into_response(self) -> Response {
        let mut response = (self.status, axum::Json(ApiError { error: self.message })).into_response();
        if let Some(seconds) = self.retry_after {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

/// A JSON body of type `T`, at most [`MAX_BODY_BYTES`], decoded with the failing field's
/// path in the error. A body that does not arrive within the server's body timeout gets a
/// 408 (see [`super::limits::TimedBody`]).
#[derive(Debug)]
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiFailure;

    async fn from_request(req: Request, _state: &S) -> Result<Self, Self::Rejection> {
        let too_large =
            || ApiFailure::new(StatusCode::PAYLOAD_TOO_LARGE, format!("request body exceeds {MAX_BODY_BYTES} bytes"));
        if let Some(content_type) = req.headers().get(header::CONTENT_TYPE) {
            let text = content_type.to_str().unwrap_or("");
            if !text.starts_with("application/json") {
                return Err(ApiFailure::new(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    format!("content type {text:?} is not application/json"),
                ));
            }
        }
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok());
        if declared.is_some_and(|n| n > MAX_BODY_BYTES) {
            return Err(too_large());
        }
        let bytes = match Limited::new(req.into_body(), MAX_BODY_BYTES).collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => return Err(too_large()),
            Err(e) => {
                return Err(match super::limits::find_body_timeout(&*e) {
                    Some(timeout) => ApiFailure::new(
                        StatusCode::REQUEST_TIMEOUT,
                        format!("{timeout}; send the whole body without pausing"),
                    ),
                    None => ApiFailure::bad_request(format!("reading the request body: {e}")),
                });
            }
        };
        let mut deserializer = serde_json::Deserializer::from_slice(&bytes);
        let value: T = serde_path_to_error::deserialize(&mut deserializer).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            if path == "." || path.is_empty() {
                ApiFailure::bad_request(format!("malformed JSON body: {inner}"))
            } else {
                ApiFailure::bad_request(format!("malformed JSON body at {path}: {inner}"))
            }
        })?;
        deserializer.end().map_err(|e| ApiFailure::bad_request(format!("malformed JSON body: {e}")))?;
        Ok(ApiJson(value))
    }
}
