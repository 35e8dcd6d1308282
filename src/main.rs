//! The `rustmail` command: `serve`, `check-config`, `hash-password`.

use std::io::{BufRead, IsTerminal};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

use rustmail::config::{self, Settings};
use rustmail::{accounts, dev, logging, server, systemd};

#[derive(Parser)]
#[command(
    name = "rustmail",
    version,
    about = "A small mail server: SMTP in, Maildir storage, POP3 out, native to systemd.",
    after_help = "Start here: `rustmail serve` runs a development server on 127.0.0.1:2525 (SMTP) and \
127.0.0.1:1110 (POP3) with a demo account, no config file needed. See README.md for the configuration."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the mail server (in the foreground; logs go to stderr or the journal).
    Serve {
        /// TOML configuration file. Without it: the development default with a demo account.
        #[arg(long, short, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Validate a configuration file (and the environment overrides) without starting anything.
    CheckConfig {
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
        /// Do not read `password_hash_file`s, only check that their paths are absolute (for build-time
        /// checks, where the secrets are not present).
        #[arg(long)]
        skip_secret_files: bool,
    },
    /// Read a password (from the terminal, or the first line of stdin) and print its argon2id hash.
    HashPassword,
    /// The outbound queue: list it, retry now, or drop a message.
    Queue {
        #[command(subcommand)]
        action: QueueAction,
        /// The server's configuration file (for its storage root). Without it: the development default.
        #[arg(long, short, value_name = "FILE", global = true)]
        config: Option<PathBuf>,
    },
    /// Make a DKIM signing key for DOMAIN: writes the private key (PEM) and prints the DNS record to
    /// publish and the configuration to add.
    DkimKeygen {
        domain: String,
        /// The selector: the record is published at SELECTOR._domainkey.DOMAIN.
        #[arg(long, default_value = "rustmail")]
        selector: String,
        #[arg(long, value_enum, default_value = "rsa")]
        algorithm: KeyAlgorithm,
        /// Where to write the key (created 0600, never overwritten). Default: DOMAIN.SELECTOR.dkim.pem
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum QueueAction {
    /// Every queued message and the state of each recipient.
    List,
    /// Try the pending recipients of every message (or of ID) now.
    Flush { id: Option<String> },
    /// Drop a message from the queue, undelivered and unreported.
    Remove { id: String },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum KeyAlgorithm {
    /// RSA-2048 (RFC 8301): verified by every receiver.
    Rsa,
    /// Ed25519 (RFC 8463): short, but not verified everywhere; publish it beside an RSA key.
    Ed25519,
}

fn main() -> ExitCode {
    // Inherited sockets and the watchdog interval are taken before any thread exists (see systemd.rs).
    // SAFETY: nothing has spawned a thread yet.
    let inherited = unsafe { systemd::take_inherited_sockets() };
    let watchdog = unsafe { systemd::take_watchdog() };
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve { config } => inherited
            .context("cannot adopt the sockets passed by systemd")
            .and_then(|inherited| serve(config, inherited, watchdog)),
        Command::CheckConfig {
            config,
            skip_secret_files,
        } => check_config(&config, skip_secret_files),
        Command::HashPassword => hash_password(),
        Command::Queue { action, config } => queue(action, config.as_deref()),
        Command::DkimKeygen {
            domain,
            selector,
            algorithm,
            out,
        } => dkim_keygen(&domain, &selector, algorithm, out),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rustmail: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The configuration as `serve` sees it: the file, or the development default with its demo account.
fn load(path: Option<&Path>, announce: bool) -> Result<Settings, config::ConfigError> {
    let mut raw = config::load(path)?;
    if path.is_none() {
        dev::add_demo_account(&mut raw, announce).map_err(|e| {
            config::ConfigError::invalid(
                "storage_root",
                format!("cannot set up the demo account: {e}"),
            )
        })?;
    }
    Settings::from_config(raw)
}

fn serve(
    path: Option<PathBuf>,
    inherited: Vec<systemd::InheritedSocket>,
    watchdog: Option<std::time::Duration>,
) -> anyhow::Result<()> {
    logging::init();
    let settings = load(path.as_deref(), true).context("invalid configuration")?;
    let reloader: server::Reloader = Box::new(move || load(path.as_deref(), false));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("rustmail")
        .build()?;
    let result = runtime.block_on(server::run(settings, reloader, inherited, watchdog));
    if let Err(e) = &result {
        tracing::error!("{e:#}");
    }
    // Sessions still running past the stop deadline are dropped here, not waited for.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    result
}

fn check_config(path: &Path, skip_secret_files: bool) -> anyhow::Result<()> {
    let secrets = if skip_secret_files {
        config::SecretFiles::Skip
    } else {
        config::SecretFiles::Read
    };
    let settings = config::load_settings(Some(path), secrets)?;
    if let Some(warning) = settings
        .tls
        .as_ref()
        .and_then(|t| t.expiry_warning(rustmail::tls::now_unix()))
    {
        eprintln!("warning: {warning}");
    }
    let accounts = settings.directory.accounts().count();
    let domains: Vec<&str> = settings.directory.domains().collect();
    println!(
        "{}: OK ({} listeners, {accounts} accounts, domains: {})",
        path.display(),
        settings.listeners.len(),
        domains.join(", ")
    );
    Ok(())
}

fn hash_password() -> anyhow::Result<()> {
    let password = if std::io::stdin().is_terminal() {
        let first = rpassword::prompt_password("Password: ")?;
        let again = rpassword::prompt_password("Again: ")?;
        anyhow::ensure!(first == again, "the passwords differ");
        first
    } else {
        let mut line = String::new();
        std::io::stdin().lock().read_line(&mut line)?;
        line.trim_end_matches(['\r', '\n']).to_string()
    };
    anyhow::ensure!(!password.is_empty(), "empty password");
    println!("{}", accounts::hash_password(password.as_bytes()));
    Ok(())
}

fn queue(action: QueueAction, config: Option<&Path>) -> anyhow::Result<()> {
    use rustmail::delivery::control;
    let root = config::load(config)?.storage_root;
    match action {
        QueueAction::List => {
            let queue = rustmail::storage::queue::Queue::existing(&root);
            let entries = queue.load()?;
            if entries.is_empty() {
                println!("the queue of {} is empty", root.display());
            }
            for entry in entries {
                print!("{}", rustmail::delivery::listing(&entry));
            }
            Ok(())
        }
        QueueAction::Flush { id } => {
            let request = match &id {
                Some(id) => format!("flush {id}"),
                None => "flush".to_string(),
            };
            let n = control::request(&root, &request).map_err(anyhow::Error::msg)?;
            println!("{n} messages will be tried now");
            Ok(())
        }
        QueueAction::Remove { id } => {
            control::request(&root, &format!("remove {id}")).map_err(anyhow::Error::msg)?;
            println!("{id} removed");
            Ok(())
        }
    }
}

fn dkim_keygen(
    domain: &str,
    selector: &str,
    algorithm: KeyAlgorithm,
    out: Option<PathBuf>,
) -> anyhow::Result<()> {
    use rustmail::dkim::{self, Algorithm};
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let domain = rustmail::accounts::normalize_domain(domain)
        .with_context(|| format!("{domain:?} is not a valid domain name"))?;
    let algorithm = match algorithm {
        KeyAlgorithm::Rsa => Algorithm::Rsa,
        KeyAlgorithm::Ed25519 => Algorithm::Ed25519,
    };
    let path = out.unwrap_or_else(|| PathBuf::from(format!("{domain}.{selector}.dkim.pem")));
    let (pem, public) = dkim::generate(algorithm).map_err(anyhow::Error::msg)?;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    file.write_all(pem.as_bytes())?;
    file.sync_all()?;
    // The key must load as the server will load it.
    dkim::DkimKey::load(&domain, selector, &path).map_err(anyhow::Error::msg)?;
    println!(
        "{}",
        dkim::txt_record(&domain, selector, algorithm, &public)
    );
    let shown = std::fs::canonicalize(&path).unwrap_or(path);
    eprintln!(
        "wrote the private key to {}\npublish the record above, then add to the configuration:\n\n\
         [[outbound.dkim]]\ndomain = \"{domain}\"\nselector = \"{selector}\"\nkey_file = \"{}\"",
        shown.display(),
        shown.display()
    );
    Ok(())
}
