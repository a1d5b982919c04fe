//! The little HTTP/1.x the metrics endpoint speaks: a request head parsed by `httparse` as its
//! bytes arrive, the answer it gets, and that answer's bytes.
//!
//! Strict where RFC 9112 is: a request line that is not `METHOD TARGET HTTP/1.0|1.1` gets 400
//! as soon as its first wrong byte is seen (HTTP/0.9, bare CRs, `HTTP/1.9`, a control byte in
//! the method), and so does an HTTP/1.1 request without exactly one `Host`. The target may be
//! in origin form (`/metrics`) or absolute form (`http://host/metrics`), as servers must
//! accept both.

use std::fmt::Write as _;

/// The most header lines read; more gets 431, as a head longer than the endpoint reads does.
const MAX_HEADERS: usize = 64;

/// What a request head asks for, once it is complete or known to be bad.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Request {
    /// `GET` of one of the endpoint's pages (`head_only: false`), or `HEAD`.
    Get { page: Page, head_only: bool },
    /// Anything else: the error response it gets.
    Refused(Response),
}

/// The pages the endpoint serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Page {
    /// `/metrics`: the counters, in the Prometheus text format.
    Metrics,
    /// `/healthz`: 200 while the server runs.
    Health,
    /// `/readyz`: 200 while the server is ready for new clients, 503 once a stop has begun.
    Ready,
}

/// Parses the head received so far: `None` while it is valid and incomplete.
pub(super) fn parse(head: &[u8]) -> Option<Request> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    match request.parse(head) {
        Ok(httparse::Status::Partial) => None,
        Ok(httparse::Status::Complete(_)) => Some(route(&request)),
        Err(httparse::Error::TooManyHeaders) => Some(Request::Refused(too_large())),
        Err(_) => Some(Request::Refused(Response::error(400, "Bad Request"))),
    }
}

/// The answer to a complete, well-formed head.
fn route(request: &httparse::Request<'_, '_>) -> Request {
    let (Some(method), Some(target), Some(minor)) = (request.method, request.path, request.version)
    else {
        // A complete parse has all three; nothing to serve without them.
        return Request::Refused(Response::error(400, "Bad Request"));
    };
    let hosts = request
        .headers
        .iter()
        .filter(|header| header.name.eq_ignore_ascii_case("host"))
        .count();
    // RFC 9112 3.2: 400 for HTTP/1.1 without a Host, and for any request with two.
    if hosts > 1 || (minor == 1 && hosts == 0) {
        return Request::Refused(Response::error(400, "Bad Request"));
    }
    let page = match path(target) {
        "/metrics" => Page::Metrics,
        "/healthz" => Page::Health,
        "/readyz" => Page::Ready,
        _ => return Request::Refused(Response::error(404, "Not Found")),
    };
    match method {
        "GET" => Request::Get {
            page,
            head_only: false,
        },
        "HEAD" => Request::Get {
            page,
            head_only: true,
        },
        _ => {
            let mut response = Response::error(405, "Method Not Allowed");
            response.headers.push(("Allow", "GET, HEAD"));
            Request::Refused(response)
        }
    }
}

/// The path of a request target, without its query: `/metrics` for `/metrics?x=1` and for
/// `http://host:9100/metrics` (RFC 9112 3.2.2, the absolute form).
fn path(target: &str) -> &str {
    let target = target.split('?').next().unwrap_or_default();
    let lower = |n: usize| target.get(..n).map(str::to_ascii_lowercase);
    let after_scheme = match () {
        () if lower(7).as_deref() == Some("http://") => &target[7..],
        () if lower(8).as_deref() == Some("https://") => &target[8..],
        () => return target,
    };
    after_scheme
        .find('/')
        .map_or("", |start| &after_scheme[start..])
}

/// 431, for a head longer than the endpoint reads.
pub(super) fn too_large() -> Response {
    Response::error(431, "Request Header Fields Too Large")
}

/// An HTTP/1.1 response, closed after it is sent.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Response {
    pub(super) status: u16,
    reason: &'static str,
    pub(super) headers: Vec<(&'static str, &'static str)>,
    pub(super) body: String,
    /// Set for HEAD: the headers are those of the body, which is not sent.
    pub(super) head_only: bool,
}

impl Response {
    /// `status` with its `reason`, and that as a plain-text body.
    pub(super) fn error(status: u16, reason: &'static str) -> Response {
        Response {
            status,
            reason,
            headers: vec![("Content-Type", "text/plain; charset=utf-8")],
            body: format!("{status} {reason}\n"),
            head_only: false,
        }
    }

    /// 200 with `body`, of `content_type`.
    pub(super) fn ok(content_type: &'static str, body: String, head_only: bool) -> Response {
        Response {
            status: 200,
            reason: "OK",
            headers: vec![("Content-Type", content_type)],
            body,
            head_only,
        }
    }

    /// `status` (200 or 503) with a one-line plain-text `body`: a health or readiness answer.
    pub(super) fn state(status: u16, body: String, head_only: bool) -> Response {
        Response {
            status,
            reason: if status == 200 {
                "OK"
            } else {
                "Service Unavailable"
            },
            headers: vec![("Content-Type", "text/plain; charset=utf-8")],
            body,
            head_only,
        }
    }

    pub(crate) fn into_bytes(self) -> Vec<u8> {
        let mut head = format!("HTTP/1.1 {} {}\r\n", self.status, self.reason);
        for (name, value) in &self.headers {
            let _ = write!(head, "{name}: {value}\r\n");
        }
        let _ = write!(
            head,
            "Content-Length: {}\r\nConnection: close\r\n\r\n",
            self.body.len()
        );
        let mut bytes = head.into_bytes();
        if !self.head_only {
            bytes.extend_from_slice(self.body.as_bytes());
        }
        bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The status `request` gets, or `None` if more bytes are awaited.
    fn status(request: &str) -> Option<u16> {
        match parse(request.as_bytes())? {
            Request::Get { .. } => Some(200),
            Request::Refused(response) => Some(response.status),
        }
    }

    #[test]
    fn only_get_or_head_of_metrics_is_answered_with_the_metrics() {
        assert_eq!(
            status("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            Some(200)
        );
        assert_eq!(status("GET /metrics?x=1 HTTP/1.0\r\n\r\n"), Some(200));
        assert_eq!(
            status("HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            Some(200)
        );
        assert_eq!(
            status("GET HTTP://x:1/metrics HTTP/1.1\nHost: x\n\n"),
            Some(200)
        );
        assert_eq!(status("GET / HTTP/1.0\r\n\r\n"), Some(404));
        assert_eq!(status("GET /metricsx HTTP/1.0\r\n\r\n"), Some(404));
        assert_eq!(status("GET http://x HTTP/1.0\r\n\r\n"), Some(404));
        assert_eq!(status("POST /metrics HTTP/1.0\r\n\r\n"), Some(405));
        assert_eq!(status("DELETE /metrics HTTP/1.0\r\n\r\n"), Some(405));
    }

    #[test]
    fn healthz_and_readyz_are_pages_too() {
        for page in ["/healthz", "/readyz"] {
            let get = format!("GET {page} HTTP/1.0\r\n\r\n");
            let head = format!("HEAD {page}?verbose HTTP/1.1\r\nHost: x\r\n\r\n");
            let post = format!("POST {page} HTTP/1.0\r\n\r\n");
            assert_eq!(status(&get), Some(200), "{page}");
            assert_eq!(status(&head), Some(200), "{page}");
            assert_eq!(status(&post), Some(405), "{page}");
        }
        assert_eq!(status("GET /health HTTP/1.0\r\n\r\n"), Some(404));
    }

    #[test]
    fn a_bad_request_line_is_refused_as_soon_as_it_shows() {
        assert_eq!(status("GET /metrics HTTP/1.1\r\n"), None);
        assert_eq!(status("GET /metrics\r\n"), Some(400));
        assert_eq!(status("GET /metrics SPDY/3\r\n"), Some(400));
        assert_eq!(status("GET /metrics HTTP/1.9"), Some(400));
        assert_eq!(status("GET /metrics HTTP/1.1x"), Some(400));
        assert_eq!(status("GET /metrics HTTP/1.1\r\r"), Some(400));
        assert_eq!(status("G\u{1}T"), Some(400));
        assert_eq!(status("\u{0}\u{ff}"), Some(400));
    }

    #[test]
    fn http_1_1_needs_exactly_one_host() {
        assert_eq!(status("GET /metrics HTTP/1.1\r\n\r\n"), Some(400));
        assert_eq!(
            status("GET /metrics HTTP/1.1\r\nHost: a\r\nhost: b\r\n\r\n"),
            Some(400)
        );
        assert_eq!(status("GET /metrics HTTP/1.0\r\n\r\n"), Some(200));
    }

    #[test]
    fn too_many_header_lines_get_431() {
        let head = format!("GET /metrics HTTP/1.0\r\n{}\r\n", "a: b\r\n".repeat(65));
        assert_eq!(status(&head), Some(431));
    }
}
