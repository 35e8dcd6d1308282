//! The test-support layer shared by the integration tests that run the real binary: the binary, a
//! password hash, one way to write a configuration ([`config::Config`]) and one line client
//! ([`client::LineClient`]). (Each test crate uses a part of it.)
#![allow(dead_code)]

pub mod client;
pub mod config;

use std::io::Write;
use std::process::{Command, Stdio};

pub const BIN: &str = env!("CARGO_BIN_EXE_rustmail");

/// `rustmail hash-password` for `password`.
pub fn hash_password(password: &str) -> String {
    let mut child = Command::new(BIN)
        .arg("hash-password")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    writeln!(child.stdin.take().unwrap(), "{password}").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}
