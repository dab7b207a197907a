//! In-process SMTP relays for tests, on 127.0.0.1 only.
//!
//! - [`FakeSmtp`]: a real SMTP server (mailin-embedded, blocking, on its own threads) that
//!   captures every message and answers chosen recipients with 4xx or 5xx at RCPT. It counts
//!   sessions (one EHLO per session), so connection reuse is observable.
//! - [`ScriptedSmtp`]: a small hand-written tokio server for what mailin cannot do: never
//!   greet, drop the connection during DATA, 421 at MAIL, close idle sessions, refuse AUTH,
//!   answer each message's data late or with a chosen code ([`ScriptedSmtp::on_message`]),
//!   STARTTLS and implicit TLS with a self-signed certificate ([`SelfSigned`], from rcgen),
//!   PIPELINING (RFC 2920) held to the letter, and noticing a client that pipelines unasked. It
//!   builds its TLS config on the `ring` provider explicitly, like the transport, so no test
//!   relies on rustls' process-wide default provider.
//!
//! ```ignore
//! let relay = FakeSmtp::new().defer("slow@x.test", 451).reject("gone@x.test", 550).start();
//! let port = relay.port();
//! assert_eq!(relay.messages()[0].to, ["ok@x.test"]);
//!
//! let relay = ScriptedSmtp::new().starttls(&SelfSigned::localhost()).start().await;
//! ```

use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use mailin_embedded::{Handler, Response, Server, SslConfig, response};
use rustls::ServerConfig;
use rustls::pki_types::PrivateKeyDer;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

/// Sessions mailin serves at once (its thread pool size).
const MAILIN_THREADS: u32 = 4;
/// Name both fakes greet with.
const FAKE_NAME: &str = "fake.test";

/// One message as the relay received it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Captured {
    /// MAIL FROM address.
    pub from: String,
    /// RCPT TO addresses that were accepted.
    pub to: Vec<String>,
    /// Message bytes after un-dot-stuffing, without the terminating `.` line.
    pub data: Vec<u8>,
}

/// Captured messages, shared with the server threads.
pub type Inbox = Arc<Mutex<Vec<Captured>>>;

fn snapshot(inbox: &Inbox) -> Vec<Captured> {
    inbox.lock().unwrap_or_else(PoisonError::into_inner).clone()
}

// === FakeSmtp ===

/// Builds a mailin-embedded relay; see the module docs.
#[derive(Debug, Default)]
pub struct FakeSmtp {
    /// Recipient → reply code at RCPT.
    answers: HashMap<String, u16>,
    /// Recipient → how many times more to defer before accepting.
    defer_times: HashMap<String, usize>,
}

impl FakeSmtp {
    /// A relay that accepts every recipient.
    pub fn new() -> Self {
        Self::default()
    }

    /// Answers RCPT TO `rcpt` with the transient `code` (4xx), text `4.3.0 try again later`.
    pub fn defer(mut self, rcpt: &str, code: u16) -> Self {
        assert!((400..500).contains(&code), "defer takes a 4xx code");
        self.answers.insert(rcpt.to_string(), code);
        self
    }

    /// Answers RCPT TO `rcpt` with the transient `code` the first `times` times, then accepts.
    pub fn defer_times(mut self, rcpt: &str, code: u16, times: usize) -> Self {
        assert!((400..500).contains(&code), "defer takes a 4xx code");
        self.answers.insert(rcpt.to_string(), code);
        self.defer_times.insert(rcpt.to_string(), times);
        self
    }

    /// Answers RCPT TO `rcpt` with the permanent `code` (5xx), text `5.1.1 no such user`.
    pub fn reject(mut self, rcpt: &str, code: u16) -> Self {
        assert!((500..600).contains(&code), "reject takes a 5xx code");
        self.answers.insert(rcpt.to_string(), code);
        self
    }

    /// Starts serving on a random port of 127.0.0.1, on background threads that live as long
    /// as the test process (mailin has no shutdown).
    pub fn start(self) -> FakeSmtpHandle {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let port = listener.local_addr().expect("local addr").port();
        let inbox = Inbox::default();
        let sessions = Arc::new(AtomicUsize::new(0));
        let handler = Capture {
            answers: Arc::new(self.answers),
            remaining: Arc::new(Mutex::new(self.defer_times)),
            inbox: inbox.clone(),
            sessions: sessions.clone(),
            current: Captured::default(),
        };
        let mut server = Server::new(handler);
        server
            .with_name(FAKE_NAME)
            .with_num_threads(MAILIN_THREADS)
            .with_ssl(SslConfig::None)
            .expect("SslConfig::None")
            .with_tcp_listener(listener);
        // serve()'s error is !Send; it only returns on a listener failure.
        std::thread::spawn(move || {
            let _ = server.serve();
        });
        FakeSmtpHandle {
            port,
            inbox,
            sessions,
        }
    }
}

/// A running [`FakeSmtp`].
#[derive(Debug, Clone)]
pub struct FakeSmtpHandle {
    port: u16,
    inbox: Inbox,
    sessions: Arc<AtomicUsize>,
}

impl FakeSmtpHandle {
    /// The port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The messages received so far (shared, live).
    pub fn received(&self) -> Inbox {
        self.inbox.clone()
    }

    /// A copy of the messages received so far.
    pub fn messages(&self) -> Vec<Captured> {
        snapshot(&self.inbox)
    }

    /// Sessions that said EHLO/HELO (one per connection with mail-send).
    pub fn sessions(&self) -> usize {
        self.sessions.load(Ordering::SeqCst)
    }
}

/// The mailin handler; mailin clones it per connection, so `current` is per session.
#[derive(Clone)]
struct Capture {
    answers: Arc<HashMap<String, u16>>,
    remaining: Arc<Mutex<HashMap<String, usize>>>,
    inbox: Inbox,
    sessions: Arc<AtomicUsize>,
    current: Captured,
}

impl Handler for Capture {
    fn helo(&mut self, _ip: IpAddr, _domain: &str) -> Response {
        self.sessions.fetch_add(1, Ordering::SeqCst);
        response::OK
    }

    fn mail(&mut self, _ip: IpAddr, _domain: &str, from: &str) -> Response {
        self.current = Captured {
            from: from.to_string(),
            ..Captured::default()
        };
        response::OK
    }

    fn rcpt(&mut self, to: &str) -> Response {
        {
            let mut remaining = self
                .remaining
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if let Some(n) = remaining.get_mut(to) {
                if *n == 0 {
                    self.current.to.push(to.to_string());
                    return response::OK;
                }
                *n -= 1;
            }
        }
        match self.answers.get(to) {
            Some(&code) if code < 500 => Response::custom(code, "4.3.0 try again later".into()),
            Some(&code) => Response::custom(code, "5.1.1 no such user".into()),
            None => {
                self.current.to.push(to.to_string());
                response::OK
            }
        }
    }

    fn data(&mut self, buf: &[u8]) -> std::io::Result<()> {
        self.current.data.extend_from_slice(buf);
        Ok(())
    }

    fn data_end(&mut self) -> Response {
        let done = std::mem::take(&mut self.current);
        self.inbox
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(done);
        response::OK
    }
}

// === ScriptedSmtp ===

/// A self-signed certificate and the server TLS config that presents it.
#[derive(Clone)]
pub struct SelfSigned {
    config: Arc<ServerConfig>,
}

impl SelfSigned {
    /// A fresh certificate for `localhost` and `127.0.0.1`.
    pub fn localhost() -> Self {
        let rcgen::CertifiedKey { cert, signing_key } =
            rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()])
                .expect("rcgen self-signed certificate");
        let config =
            ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .expect("ring protocol versions")
                .with_no_client_auth()
                .with_single_cert(vec![cert.der().clone()], PrivateKeyDer::from(signing_key))
                .expect("server certificate");
        SelfSigned {
            config: Arc::new(config),
        }
    }
}

/// The fault a [`ScriptedSmtp`] injects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// Accept the connection, never send the greeting.
    NeverGreet,
    /// Answer DATA with 354, read one line of the message, close.
    DropDuringData,
    /// Answer MAIL with 421 and close.
    Close421AtMail,
}

/// Decides the final reply to a message, given its index (0 for the first message whose data
/// arrived, across sessions): may wait first (a slow relay) or act on the test's behalf.
type OnMessage = Arc<dyn Fn(usize) -> Pin<Box<dyn Future<Output = u16> + Send>> + Send + Sync>;

/// How a [`ScriptedSmtp`] does TLS.
#[derive(Clone)]
enum Tls {
    None,
    Starttls(SelfSigned),
    Implicit(SelfSigned),
}

/// Builds a hand-written tokio relay; see the module docs. Without faults it accepts
/// everything and captures messages like [`FakeSmtp`].
#[derive(Clone)]
pub struct ScriptedSmtp {
    fault: Option<Fault>,
    tls: Tls,
    refuse_auth: bool,
    close_after_messages: Option<usize>,
    /// Recipient → permanent reply code at RCPT.
    rejects: HashMap<String, u16>,
    /// The fault applies to the first this-many connections only.
    fault_connections: usize,
    /// Offers PIPELINING, and holds the replies to MAIL and RCPT until DATA arrives.
    pipelining: bool,
    /// Answers DATA with 354 even when no recipient was accepted (a broken relay).
    data_without_recipients: bool,
    /// The final reply to each message (default: 250 at once).
    on_message: Option<OnMessage>,
}

impl Default for ScriptedSmtp {
    fn default() -> Self {
        Self::new()
    }
}

impl ScriptedSmtp {
    /// A relay that accepts everything, without TLS.
    pub fn new() -> Self {
        ScriptedSmtp {
            fault: None,
            tls: Tls::None,
            refuse_auth: false,
            close_after_messages: None,
            rejects: HashMap::new(),
            fault_connections: usize::MAX,
            pipelining: false,
            data_without_recipients: false,
            on_message: None,
        }
    }

    /// Offers PIPELINING and answers MAIL and RCPT only once DATA has arrived, all replies in
    /// one write (RFC 2920 lets a server buffer its replies): a client that waits for each
    /// reply before the next command gets none and times out.
    pub fn pipelining(mut self) -> Self {
        self.pipelining = true;
        self
    }

    /// Answers DATA with 354 even when every recipient was refused, where a relay should
    /// answer 554 (RFC 2920 §3.1).
    pub fn data_without_recipients(mut self) -> Self {
        self.data_without_recipients = true;
        self
    }

    /// Once a message's data has arrived, awaits `f(index)` (index 0 is the first message
    /// whose data arrived, across sessions) and answers with the code it yields: 2xx accepts
    /// and captures the message, 4xx or 5xx refuses it. The future may sleep (a slow relay),
    /// wait for the test, or move a clock.
    pub fn on_message<F, Fut>(mut self, f: F) -> Self
    where
        F: Fn(usize) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = u16> + Send + 'static,
    {
        self.on_message = Some(Arc::new(move |i| Box::pin(f(i))));
        self
    }

    /// Accepts connections and never greets.
    pub fn never_greet(mut self) -> Self {
        self.fault = Some(Fault::NeverGreet);
        self
    }

    /// Closes the connection in the middle of DATA.
    pub fn drop_during_data(mut self) -> Self {
        self.fault = Some(Fault::DropDuringData);
        self
    }

    /// Answers MAIL with `421 4.4.2 closing` and closes.
    pub fn close_with_421_at_mail(mut self) -> Self {
        self.fault = Some(Fault::Close421AtMail);
        self
    }

    /// Silently closes a session after it delivered `n` messages (an idle disconnect the
    /// client only notices on its next command).
    pub fn close_after_messages(mut self, n: usize) -> Self {
        self.close_after_messages = Some(n);
        self
    }

    /// Answers RCPT TO `rcpt` with the permanent `code` (5xx), text `5.1.1 no such user`.
    pub fn reject(mut self, rcpt: &str, code: u16) -> Self {
        assert!((500..600).contains(&code), "reject takes a 5xx code");
        self.rejects.insert(rcpt.to_string(), code);
        self
    }

    /// Answers every AUTH with `535 5.7.8 authentication failed`.
    pub fn refuse_auth(mut self) -> Self {
        self.refuse_auth = true;
        self
    }

    /// Applies the fault to the first `n` connections only; later ones behave.
    pub fn fault_first(mut self, n: usize) -> Self {
        self.fault_connections = n;
        self
    }

    /// Offers STARTTLS with `cert`.
    pub fn starttls(mut self, cert: &SelfSigned) -> Self {
        self.tls = Tls::Starttls(cert.clone());
        self
    }

    /// Speaks TLS from the first byte with `cert` (SMTPS).
    pub fn implicit_tls(mut self, cert: &SelfSigned) -> Self {
        self.tls = Tls::Implicit(cert.clone());
        self
    }

    /// Starts serving on a random port of 127.0.0.1 until the test's runtime ends.
    pub async fn start(self) -> ScriptedHandle {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let port = listener.local_addr().expect("local addr").port();
        let handle = ScriptedHandle {
            port,
            inbox: Inbox::default(),
            connections: Arc::new(AtomicUsize::new(0)),
            commands: Arc::new(Mutex::new(Vec::new())),
            unasked_pipelining: Arc::new(AtomicUsize::new(0)),
            data_seen: Arc::new(AtomicUsize::new(0)),
        };
        let script = Arc::new(self);
        let shared = handle.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let index = shared.connections.fetch_add(1, Ordering::SeqCst);
                let mut script = (*script).clone();
                if index >= script.fault_connections {
                    script.fault = None;
                }
                let shared = shared.clone();
                tokio::spawn(async move {
                    // A session ends with an error whenever the client goes away; that is fine.
                    let _ = script.serve(stream, &shared).await;
                });
            }
        });
        handle
    }

    async fn serve(&self, stream: TcpStream, shared: &ScriptedHandle) -> std::io::Result<()> {
        if self.fault == Some(Fault::NeverGreet) {
            let mut stream = stream;
            let mut sink = Vec::new();
            // Hold the connection open until the client gives up.
            stream.read_to_end(&mut sink).await?;
            return Ok(());
        }
        let (io, mut tls_active): (Box<dyn Io>, bool) = match &self.tls {
            Tls::Implicit(cert) => (
                Box::new(
                    TlsAcceptor::from(cert.config.clone())
                        .accept(stream)
                        .await?,
                ),
                true,
            ),
            Tls::None | Tls::Starttls(_) => (Box::new(stream), false),
        };
        let mut io = BufReader::new(io);
        reply(&mut io, &format!("220 {FAKE_NAME} ESMTP scripted\r\n")).await?;
        let mut current = Captured::default();
        let mut delivered = 0;
        // Replies to MAIL and RCPT held back until DATA (pipelining only).
        let mut held = String::new();
        loop {
            let Some(line) = read_line(&mut io).await? else {
                return Ok(());
            };
            shared.log(&line);
            let verb = line
                .split([' ', ':'])
                .next()
                .unwrap_or_default()
                .to_ascii_uppercase();
            if !self.pipelining
                && matches!(verb.as_str(), "MAIL" | "RCPT")
                && !io.buffer().is_empty()
            {
                // The next command came before this one's reply was sent.
                shared.unasked_pipelining.fetch_add(1, Ordering::SeqCst);
            }
            match verb.as_str() {
                "EHLO" | "HELO" => {
                    let mut r = format!("250-{FAKE_NAME}\r\n");
                    if matches!(self.tls, Tls::Starttls(_)) && !tls_active {
                        r.push_str("250-STARTTLS\r\n");
                    }
                    if self.pipelining {
                        r.push_str("250-PIPELINING\r\n");
                    }
                    r.push_str("250-AUTH PLAIN\r\n250 8BITMIME\r\n");
                    reply(&mut io, &r).await?;
                }
                "STARTTLS" => {
                    let Tls::Starttls(cert) = &self.tls else {
                        reply(&mut io, "502 5.5.1 not offered\r\n").await?;
                        continue;
                    };
                    reply(&mut io, "220 2.0.0 ready to start TLS\r\n").await?;
                    let plain = io.into_inner();
                    let tls = TlsAcceptor::from(cert.config.clone()).accept(plain).await?;
                    io = BufReader::new(Box::new(tls));
                    tls_active = true;
                }
                "AUTH" if self.refuse_auth => {
                    reply(&mut io, "535 5.7.8 authentication failed\r\n").await?;
                }
                "AUTH" => reply(&mut io, "235 2.7.0 authenticated\r\n").await?,
                "MAIL" if self.fault == Some(Fault::Close421AtMail) => {
                    reply(&mut io, "421 4.4.2 closing\r\n").await?;
                    return Ok(());
                }
                "MAIL" => {
                    current = Captured {
                        from: path_of(&line),
                        ..Captured::default()
                    };
                    self.envelope_reply(&mut io, &mut held, "250 2.1.0 ok\r\n")
                        .await?;
                }
                "RCPT" => {
                    let to = path_of(&line);
                    let text = if let Some(code) = self.rejects.get(&to) {
                        format!("{code} 5.1.1 no such user\r\n")
                    } else {
                        current.to.push(to);
                        "250 2.1.5 ok\r\n".to_string()
                    };
                    self.envelope_reply(&mut io, &mut held, &text).await?;
                }
                "DATA" if current.to.is_empty() && !self.data_without_recipients => {
                    held.push_str("554 5.5.1 no valid recipients\r\n");
                    reply(&mut io, &std::mem::take(&mut held)).await?;
                }
                "DATA" => {
                    held.push_str("354 go ahead\r\n");
                    reply(&mut io, &std::mem::take(&mut held)).await?;
                    if self.fault == Some(Fault::DropDuringData) {
                        let mut first = Vec::new();
                        io.read_until(b'\n', &mut first).await?;
                        return Ok(());
                    }
                    current.data = read_data(&mut io).await?;
                    let index = shared.data_seen.fetch_add(1, Ordering::SeqCst);
                    let code = match &self.on_message {
                        Some(f) => f(index).await,
                        None => 250,
                    };
                    if !(200..300).contains(&code) {
                        current = Captured::default();
                        let text = if code < 500 {
                            "4.3.0 try again later"
                        } else {
                            "5.7.1 message refused"
                        };
                        reply(&mut io, &format!("{code} {text}\r\n")).await?;
                        continue;
                    }
                    shared
                        .inbox
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .push(std::mem::take(&mut current));
                    reply(&mut io, &format!("{code} 2.0.0 queued\r\n")).await?;
                    delivered += 1;
                    if self.close_after_messages == Some(delivered) {
                        return Ok(());
                    }
                }
                "RSET" => {
                    current = Captured::default();
                    reply(&mut io, "250 2.0.0 ok\r\n").await?;
                }
                "NOOP" => reply(&mut io, "250 2.0.0 ok\r\n").await?,
                "QUIT" => {
                    reply(&mut io, "221 2.0.0 bye\r\n").await?;
                    return Ok(());
                }
                _ => reply(&mut io, "500 5.5.2 unknown command\r\n").await?,
            }
        }
    }

    /// A reply to MAIL or RCPT: sent now, or held for DATA when pipelining.
    async fn envelope_reply(
        &self,
        io: &mut BufReader<Box<dyn Io>>,
        held: &mut String,
        text: &str,
    ) -> std::io::Result<()> {
        if self.pipelining {
            held.push_str(text);
            Ok(())
        } else {
            reply(io, text).await
        }
    }
}

/// A running [`ScriptedSmtp`].
#[derive(Debug, Clone)]
pub struct ScriptedHandle {
    port: u16,
    inbox: Inbox,
    connections: Arc<AtomicUsize>,
    commands: Arc<Mutex<Vec<String>>>,
    unasked_pipelining: Arc<AtomicUsize>,
    /// Messages whose data arrived, accepted or not.
    data_seen: Arc<AtomicUsize>,
}

impl ScriptedHandle {
    /// The port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A copy of the messages received so far.
    pub fn messages(&self) -> Vec<Captured> {
        snapshot(&self.inbox)
    }

    /// MAIL or RCPT commands that arrived with the next command already behind them, from
    /// a relay that does not offer PIPELINING.
    pub fn unasked_pipelining(&self) -> usize {
        self.unasked_pipelining.load(Ordering::SeqCst)
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    /// Command lines received so far, across sessions, without CRLF (AUTH lines are
    /// shortened to the mechanism).
    pub fn commands(&self) -> Vec<String> {
        self.commands
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn log(&self, line: &str) {
        let line = if line.to_ascii_uppercase().starts_with("AUTH PLAIN") {
            "AUTH PLAIN"
        } else {
            line
        };
        self.commands
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(line.to_string());
    }
}

/// A byte stream the scripted session can run on: plain TCP or TLS.
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

async fn reply(io: &mut BufReader<Box<dyn Io>>, text: &str) -> std::io::Result<()> {
    io.get_mut().write_all(text.as_bytes()).await?;
    io.get_mut().flush().await
}

/// One command line without its line end; `None` at end of stream.
async fn read_line(io: &mut BufReader<Box<dyn Io>>) -> std::io::Result<Option<String>> {
    let mut buf = Vec::new();
    if io.read_until(b'\n', &mut buf).await? == 0 {
        return Ok(None);
    }
    Ok(Some(
        String::from_utf8_lossy(&buf)
            .trim_end_matches(['\r', '\n'])
            .to_string(),
    ))
}

/// The message after DATA: lines up to `.` CRLF, dot-unstuffed (RFC 5321 §4.5.2).
async fn read_data(io: &mut BufReader<Box<dyn Io>>) -> std::io::Result<Vec<u8>> {
    let mut data = Vec::new();
    loop {
        let mut line = Vec::new();
        if io.read_until(b'\n', &mut line).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        if line == b".\r\n" {
            return Ok(data);
        }
        let unstuffed = line.strip_prefix(b".").unwrap_or(&line);
        data.extend_from_slice(unstuffed);
    }
}

/// `MAIL FROM:<a@b> SIZE=1` → `a@b`.
fn path_of(line: &str) -> String {
    line.split_once('<')
        .and_then(|(_, rest)| rest.split_once('>'))
        .map(|(path, _)| path.to_string())
        .unwrap_or_default()
}
