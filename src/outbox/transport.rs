//! Transports: where a rendered message goes. `file` (development default: one `.eml` per
//! message, written atomically), `log`, and `smtp` (the production transport, [`super::smtp`]);
//! every transport answers with one [`Outcome`], classified here and nowhere else.

use std::io::Write;
use std::path::{Path, PathBuf};

/// A message ready to hand over.
#[derive(Debug, Clone)]
pub struct OutgoingMail {
    /// File-safe unique name (the outbox entry id).
    pub name: String,
    /// Envelope sender.
    pub envelope_from: String,
    /// Envelope recipient.
    pub envelope_to: String,
    /// RFC 5322 bytes.
    pub bytes: Vec<u8>,
}

/// What the worker does after one attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Handed over for good.
    Delivered,
    /// Try again later.
    Retry {
        /// For people.
        reason: String,
        /// The peer asked us to wait at least this long (`Retry-After`); the retry policy's
        /// delay applies when it is longer or absent.
        after: Option<std::time::Duration>,
    },
    /// Never try again.
    Reject {
        /// For people.
        reason: String,
    },
}

/// Classifies a file-transport I/O error. Every kind is retried: a full disk or a permission
/// problem is an operator's to fix, and the mail should go out once they have.
pub fn classify_io(e: &std::io::Error) -> Outcome {
    Outcome::Retry {
        reason: format!("cannot write mail file: {e}"),
        after: None,
    }
}

/// A configured transport.
#[derive(Debug, Clone)]
pub enum Transport {
    /// Writes `<dir>/<name>.eml`.
    File {
        /// Target folder.
        dir: PathBuf,
    },
    /// Logs the envelope only.
    Log,
    /// An SMTP relay.
    Smtp(super::smtp::SmtpTransport),
}

impl Transport {
    /// Delivers one message.
    pub async fn send(&self, mail: OutgoingMail) -> Outcome {
        match self {
            Transport::File { dir } => {
                let dir = dir.clone();
                match tokio::task::spawn_blocking(move || write_eml(&dir, &mail)).await {
                    Ok(Ok(())) => Outcome::Delivered,
                    Ok(Err(e)) => classify_io(&e),
                    Err(e) => Outcome::Retry {
                        reason: format!("file writer task failed: {e}"),
                        after: None,
                    },
                }
            }
            Transport::Smtp(t) => t.send(mail).await,
            Transport::Log => {
                tracing::info!(
                    to = %crate::address::mask(&mail.envelope_to),
                    bytes = mail.bytes.len(),
                    "log transport: message not sent"
                );
                Outcome::Delivered
            }
        }
    }

    /// Whether the transport is usable now (for `/readyz`).
    pub fn is_ready(&self) -> bool {
        match self {
            Transport::File { dir } => dir.is_dir(),
            Transport::Log => true,
            Transport::Smtp(t) => t.has_reached_relay(),
        }
    }
}

/// Writes `dir/name.eml` atomically and durably: temp file, fsync, rename, fsync the folder.
/// A retry of the same entry overwrites the same file.
fn write_eml(dir: &Path, mail: &OutgoingMail) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".{}.eml.tmp", mail.name));
    let dst = dir.join(format!("{}.eml", mail.name));
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&mail.bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, &dst)?;
    std::fs::File::open(dir)?.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn file_transport_writes_one_file_per_message_and_overwrites_on_retry() {
        let dir = tempfile::tempdir().expect("tempdir");
        let t = Transport::File {
            dir: dir.path().join("mail"),
        };
        let m = OutgoingMail {
            name: "msg_1".into(),
            envelope_from: "a@x".into(),
            envelope_to: "b@y".into(),
            bytes: b"Subject: x\r\n\r\nbody".to_vec(),
        };
        assert_eq!(t.send(m.clone()).await, Outcome::Delivered);
        assert_eq!(t.send(m).await, Outcome::Delivered);
        let files: Vec<_> = std::fs::read_dir(dir.path().join("mail"))
            .expect("dir")
            .filter_map(Result::ok)
            .collect();
        assert_eq!(files.len(), 1);
    }

    #[tokio::test]
    async fn an_unwritable_folder_is_retried() {
        let dir = tempfile::tempdir().expect("tempdir");
        let blocker = dir.path().join("file");
        std::fs::write(&blocker, b"x").expect("write");
        let t = Transport::File {
            dir: blocker.join("sub"),
        };
        let m = OutgoingMail {
            name: "m".into(),
            envelope_from: "a@x".into(),
            envelope_to: "b@y".into(),
            bytes: vec![],
        };
        assert!(matches!(t.send(m).await, Outcome::Retry { .. }));
    }
}
