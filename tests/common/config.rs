//! The configuration file of a test server, written one way for every harness: tables of
//! `key = value` lines (TOML values), changed with [`Config::set`] by `table.key` or `key`.

use std::collections::BTreeMap;
use std::path::Path;

#[derive(Default, Clone)]
pub struct Config {
    /// "" for the top level, then table names such as "limits".
    tables: BTreeMap<String, BTreeMap<String, String>>,
    /// Verbatim text after the tables (the accounts).
    tail: String,
}

impl Config {
    /// `hostname`, `domains` and `storage_root` (under `dir`), a fast failure delay, nothing else.
    pub fn new(dir: &Path, domains: &[&str]) -> Config {
        let mut c = Config::default();
        c.set("hostname", r#""mx.example.test""#);
        let list: Vec<String> = domains.iter().map(|d| format!("{d:?}")).collect();
        c.set("domains", &format!("[{}]", list.join(", ")));
        c.set(
            "storage_root",
            &format!("{:?}", dir.join("state").display().to_string()),
        );
        c.set("auth.failure_delay_ms", "10");
        c
    }

    /// Sets `table.key` (or a top-level `key`) to the TOML value `value`.
    pub fn set(&mut self, key: &str, value: &str) -> &mut Config {
        let (table, key) = key.split_once('.').unwrap_or(("", key));
        self.tables
            .entry(table.to_string())
            .or_default()
            .insert(key.to_string(), value.to_string());
        self
    }

    /// A `key = value` line as a dialog file writes it.
    pub fn set_line(&mut self, line: &str) -> &mut Config {
        let (key, value) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("{line:?} is not key = value"));
        self.set(key.trim(), value.trim())
    }

    /// An account with `password_hash` and aliases.
    pub fn account(&mut self, address: &str, hash: &str, aliases: &[&str]) -> &mut Config {
        self.tail.push_str(&format!(
            "[accounts.{address:?}]\npassword_hash = {hash:?}\n"
        ));
        if !aliases.is_empty() {
            let list: Vec<String> = aliases.iter().map(|a| format!("{a:?}")).collect();
            self.tail
                .push_str(&format!("aliases = [{}]\n", list.join(", ")));
        }
        self
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        for (table, entries) in &self.tables {
            if !table.is_empty() {
                out.push_str(&format!("[{table}]\n"));
            }
            for (key, value) in entries {
                out.push_str(&format!("{key} = {value}\n"));
            }
        }
        out.push_str(&self.tail);
        out
    }

    /// Writes `rustmail.toml` into `dir`; returns its path.
    pub fn write(&self, dir: &Path) -> std::path::PathBuf {
        let path = dir.join("rustmail.toml");
        std::fs::write(&path, self.render()).unwrap();
        path
    }
}
