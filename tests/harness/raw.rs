//! HTTP/1 over raw TCP: a client that writes exact bytes and reads
//! responses one at a time, so framing (HEAD, 204, 304, chunked bodies,
//! keep-alive) is checked as a client on the wire sees it; and a backend
//! that records the exact bytes it receives.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long a read may wait for the server.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// One response, as read off the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawResponse {
    pub status: u16,
    /// Header names lower-cased, in order.
    pub headers: Vec<(String, String)>,
    /// The body, de-chunked.
    pub body: Vec<u8>,
}

impl RawResponse {
    /// The first value of a header.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A client connection.
#[derive(Debug)]
pub struct RawConnection {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl RawConnection {
    pub async fn connect(addr: SocketAddr) -> Self {
        let stream = TcpStream::connect(addr).await.expect("connect");
        Self {
            stream,
            buf: Vec::new(),
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.try_send(bytes).await.expect("write the request");
    }

    /// Writes bytes, reporting rather than panicking if the server has
    /// closed the connection: for tests that expect to be cut off.
    pub async fn try_send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes).await
    }

    /// Reads the next response; `to_head` says it answers a HEAD request,
    /// so it has no body whatever its headers say. `None` if the connection
    /// closed first.
    pub async fn response(&mut self, to_head: bool) -> Option<RawResponse> {
        let head_end = loop {
            if let Some(i) = find(&self.buf, b"\r\n\r\n") {
                break i;
            }
            if !self.fill().await {
                return None;
            }
        };
        let head = String::from_utf8(self.buf[..head_end].to_vec()).expect("an ASCII head");
        self.buf.drain(..head_end + 4);
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap();
        let status = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
        let headers: Vec<(String, String)> = lines
            .map(|line| {
                let (name, value) = line.split_once(':').expect("a header line");
                (name.trim().to_ascii_lowercase(), value.trim().to_owned())
            })
            .collect();
        let mut response = RawResponse {
            status,
            headers,
            body: Vec::new(),
        };
        if to_head || status == 204 || status == 304 || (100..200).contains(&status) {
            return Some(response);
        }
        if response.header("transfer-encoding") == Some("chunked") {
            response.body = self.chunked_body().await;
        } else if let Some(length) = response.header("content-length") {
            let length: usize = length.parse().expect("a content length");
            while self.buf.len() < length {
                assert!(self.fill().await, "the connection closed inside a body");
            }
            response.body = self.buf.drain(..length).collect();
        } else {
            // Delimited by the end of the connection.
            while self.fill().await {}
            response.body = std::mem::take(&mut self.buf);
        }
        Some(response)
    }

    /// Everything the server sends until it closes the connection (or the
    /// read timeout passes).
    pub async fn read_to_close(&mut self) -> Vec<u8> {
        while self.fill().await {}
        std::mem::take(&mut self.buf)
    }

    /// Whether the server closed the connection (within the read timeout).
    pub async fn is_closed(&mut self) -> bool {
        !self.fill().await
    }

    async fn chunked_body(&mut self) -> Vec<u8> {
        let mut body = Vec::new();
        loop {
            let line_end = loop {
                if let Some(i) = find(&self.buf, b"\r\n") {
                    break i;
                }
                assert!(
                    self.fill().await,
                    "the connection closed inside a chunk size"
                );
            };
            let size_line = String::from_utf8_lossy(&self.buf[..line_end]).into_owned();
            let size = usize::from_str_radix(size_line.split(';').next().unwrap().trim(), 16)
                .unwrap_or_else(|_| panic!("bad chunk size {size_line:?}"));
            self.buf.drain(..line_end + 2);
            if size == 0 {
                // Trailers, if any, end with an empty line.
                loop {
                    if let Some(i) = find(&self.buf, b"\r\n") {
                        let empty = i == 0;
                        self.buf.drain(..i + 2);
                        if empty {
                            return body;
                        }
                    } else {
                        assert!(self.fill().await, "the connection closed inside trailers");
                    }
                }
            }
            while self.buf.len() < size + 2 {
                assert!(self.fill().await, "the connection closed inside a chunk");
            }
            body.extend(self.buf.drain(..size));
            self.buf.drain(..2);
        }
    }

    /// Reads more bytes; false at the end of the stream or on timeout.
    async fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 16 * 1024];
        match tokio::time::timeout(READ_TIMEOUT, self.stream.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => {
                self.buf.extend_from_slice(&chunk[..n]);
                true
            }
            _ => false,
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// A backend that records the exact bytes of every request it receives and
/// answers each with those bytes as its body. It reads requests as a
/// strict HTTP/1.1 server would (a `Content-Length` or chunked body), so a
/// request it records is one a server would have acted on.
#[derive(Debug)]
pub struct RawBackend {
    addr: SocketAddr,
    complete: Recorded,
    /// Bytes of requests whose connection ended before they were whole.
    incomplete: Recorded,
    task: tokio::task::JoinHandle<()>,
}

impl RawBackend {
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("address");
        let (complete, incomplete) = (Recorded::default(), Recorded::default());
        let task = tokio::spawn({
            let (complete, incomplete) = (Arc::clone(&complete), Arc::clone(&incomplete));
            async move {
                while let Ok((stream, _)) = listener.accept().await {
                    let (complete, incomplete) = (Arc::clone(&complete), Arc::clone(&incomplete));
                    tokio::spawn(serve_raw(stream, complete, incomplete));
                }
            }
        });
        Self {
            addr,
            complete,
            incomplete,
            task,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The whole requests received, health checks aside, as text.
    pub fn requests(&self) -> Vec<String> {
        self.complete
            .lock()
            .unwrap()
            .iter()
            .map(|bytes| String::from_utf8_lossy(bytes).into_owned())
            .filter(|request| !request.contains("spike-balancer health check"))
            .collect()
    }

    /// Requests that never arrived whole.
    pub fn incomplete(&self) -> usize {
        self.incomplete.lock().unwrap().len()
    }
}

impl Drop for RawBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Requests as the bytes received, shared by a backend's connections.
type Recorded = Arc<Mutex<Vec<Vec<u8>>>>;

async fn serve_raw(mut stream: TcpStream, complete: Recorded, incomplete: Recorded) {
    let mut buf: Vec<u8> = Vec::new();
    loop {
        let end = loop {
            if let Some(end) = request_end(&buf) {
                break end;
            }
            let mut chunk = [0u8; 16 * 1024];
            match stream.read(&mut chunk).await {
                Ok(n) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                _ => {
                    if !buf.is_empty() {
                        incomplete.lock().unwrap().push(buf);
                    }
                    return;
                }
            }
        };
        let request: Vec<u8> = buf.drain(..end).collect();
        let mut reply = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n",
            request.len()
        )
        .into_bytes();
        reply.extend_from_slice(&request);
        complete.lock().unwrap().push(request);
        if stream.write_all(&reply).await.is_err() {
            return;
        }
    }
}

/// Where the first whole request in `buf` ends, if it is there.
fn request_end(buf: &[u8]) -> Option<usize> {
    let head_end = find(buf, b"\r\n\r\n")? + 4;
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let header = |name: &str| {
        head.lines()
            .find_map(|line| line.strip_prefix(name).map(|v| v.trim().to_owned()))
    };
    if header("transfer-encoding:").is_some_and(|te| te.ends_with("chunked")) {
        let mut at = head_end;
        loop {
            let line_end = at + find(&buf[at..], b"\r\n")?;
            let size =
                usize::from_str_radix(String::from_utf8_lossy(&buf[at..line_end]).trim(), 16)
                    .ok()?;
            at = line_end + 2;
            if size == 0 {
                // No trailers from the balancer: an empty line ends it.
                return (buf.len() >= at + 2).then_some(at + 2);
            }
            if buf.len() < at + size + 2 {
                return None;
            }
            at += size + 2;
        }
    }
    let length: usize = header("content-length:")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    (buf.len() >= head_end + length).then_some(head_end + length)
}
