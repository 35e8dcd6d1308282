//! The control socket `rustmail queue flush|remove` talk to while the server runs: a Unix socket in
//! the storage root (itself 0700), answering only its own user and root. One request line, one reply
//! line: `flush [ID]` → `ok N`, `remove ID` → `ok`, or `error TEXT`.

use std::io::{self, BufRead, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;
use tokio_util::sync::CancellationToken;

use super::Outbox;

pub fn socket_path(storage_root: &Path) -> PathBuf {
    storage_root.join("control.sock")
}

/// Listens on the control socket until `shutdown`.
pub fn listen(storage_root: &Path) -> io::Result<UnixListener> {
    let path = socket_path(storage_root);
    // Only a stale socket can be here: the storage root is locked by this instance.
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

pub async fn serve(listener: UnixListener, outbox: Arc<Outbox>, shutdown: CancellationToken) {
    let me = nix::unistd::Uid::effective().as_raw();
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "control socket accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => return,
        };
        let allowed = stream
            .peer_cred()
            .is_ok_and(|cred| cred.uid() == me || cred.uid() == 0);
        let outbox = outbox.clone();
        tokio::spawn(async move {
            let (read, mut write) = stream.into_split();
            let mut line = String::new();
            let mut reader = BufReader::new(read.take(1024));
            let answer = if !allowed {
                "error permission denied".to_string()
            } else {
                match tokio::time::timeout(Duration::from_secs(5), reader.read_line(&mut line))
                    .await
                {
                    Ok(Ok(_)) => answer(&outbox, line.trim()).await,
                    _ => "error no request".to_string(),
                }
            };
            let _ = write.write_all(format!("{answer}\n").as_bytes()).await;
        });
    }
}

async fn answer(outbox: &Outbox, request: &str) -> String {
    let mut words = request.split_ascii_whitespace();
    let result = match (words.next(), words.next(), words.next()) {
        (Some("flush"), id, None) => outbox
            .flush(id.map(str::to_string))
            .await
            .map(|n| format!("ok {n}")),
        (Some("remove"), Some(id), None) => {
            outbox.remove(id.to_string()).await.map(|()| "ok".into())
        }
        _ => Err(format!("unknown request {request:?}")),
    };
    result.unwrap_or_else(|e| format!("error {e}"))
}

/// The client side: sends one request to the server of `storage_root`, returns its answer (`ok …`)
/// or the error it gave.
pub fn request(storage_root: &Path, request: &str) -> Result<String, String> {
    let path = socket_path(storage_root);
    let mut stream = std::os::unix::net::UnixStream::connect(&path)
        .map_err(|e| format!("cannot reach the running server at {}: {e}", path.display()))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    stream
        .write_all(format!("{request}\n").as_bytes())
        .map_err(|e| e.to_string())?;
    let mut line = String::new();
    io::BufReader::new(stream)
        .read_line(&mut line)
        .map_err(|e| e.to_string())?;
    let line = line.trim_end();
    match line.strip_prefix("ok") {
        Some(rest) => Ok(rest.trim().to_string()),
        None => Err(line.strip_prefix("error ").unwrap_or(line).to_string()),
    }
}
