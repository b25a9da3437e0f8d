//! The console's page: plain HTML, CSS and JavaScript under `operator/console/`, compiled
//! into the binary so the console works with no internet, no CDN and no build step.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::server::body::ApiFailure;

/// Name, content type, content.
const ASSETS: &[(&str, &str, &str)] = &[
    ("index.html", "text/html; charset=utf-8", include_str!("../../console/index.html")),
    ("console.css", "text/css; charset=utf-8", include_str!("../../console/console.css")),
    ("console.js", "text/javascript; charset=utf-8", include_str!("../../console/console.js")),
];

/// Only our own files, no inline script or style, no framing: a script that got into a
/// status field (a step message, a manifest error) has nowhere to run.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

pub(super) fn serve(name: &str) -> Response {
    let Some((_, content_type, body)) = ASSETS.iter().find(|(n, _, _)| *n == name) else {
        return ApiFailure::new(StatusCode::NOT_FOUND, format!("no console file {name:?}")).into_response();
    };
    let mut response = (*body).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    // A new release must not be mixed with a cached page of the previous one.
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}
