//! The CLI's configuration is the library's (`REDIS_URL`, misspelt `EVENTSOURCE_REDIS_*`
//! variables warned about, TLS options as flags and variables), it reaches a TLS-only Redis
//! (so does the dashboard), and its mistakes are one-sentence usage errors.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, Output, Stdio};

use eventsource_core::prelude::*;
use eventsource_core::testkit::orders::OrderCreated;
use eventsource_redis::{RedisEventBus, RedisEventBusConfig};
use eventsource_testsupport::{Cleanup, redis_url, unique_prefix};
use serde_json::Value;

/// The CLI with `args`, none of the bus's variables inherited except those in `env`.
fn eventsource(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_eventsource"));
    for (name, _) in std::env::vars() {
        if name.starts_with("EVENTSOURCE_REDIS_") || name == "REDIS_URL" {
            command.env_remove(name);
        }
    }
    command
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn json(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "exit {:?}: {}",
        out.status.code(),
        stderr(out)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn created() -> EventEnvelope {
    Event::new(
        uuid::Uuid::new_v4(),
        OrderCreated {
            customer_id: "c".into(),
            total_amount: 1.0,
        },
    )
    .into_envelope()
}

fn registry() -> EventRegistry {
    let registry = EventRegistry::new();
    registry.register::<OrderCreated>().unwrap();
    registry
}

#[tokio::test]
async fn the_cli_reads_the_library_s_configuration() {
    let prefix = unique_prefix("cli-config");
    let _c = Cleanup(prefix.clone());
    let bus = RedisEventBus::new(
        RedisEventBusConfig::default()
            .redis_url(redis_url())
            .stream_prefix(prefix.clone()),
        registry(),
    )
    .unwrap();
    bus.publish_events(&[created(), created()]).await.unwrap();
    // REDIS_URL is the fallback for the URL, as for the library.
    let info = eventsource(
        &["--json", "info"],
        &[
            ("REDIS_URL", &redis_url()),
            ("EVENTSOURCE_REDIS_STREAM_PREFIX", &prefix),
        ],
    );
    assert_eq!(json(&info)["stream"]["length"], 2, "{}", stderr(&info));
    // A misspelt variable is named, with the known ones.
    let typo = eventsource(
        &["--json", "info"],
        &[
            ("EVENTSOURCE_REDIS_URL", &redis_url()),
            ("EVENTSOURCE_REDIS_STREAM_PREFX", &prefix),
        ],
    );
    assert!(typo.status.success());
    let said = stderr(&typo);
    assert!(
        said.contains("EVENTSOURCE_REDIS_STREAM_PREFX") && said.contains("STREAM_PREFIX"),
        "{said}"
    );
    // A bad value of an option the CLI uses is a usage error naming the variable.
    let bad = eventsource(&["info"], &[("EVENTSOURCE_REDIS_PARTITIONS", "many")]);
    assert_eq!(bad.status.code(), Some(2), "{}", stderr(&bad));
    assert!(
        stderr(&bad).contains("EVENTSOURCE_REDIS_PARTITIONS"),
        "{}",
        stderr(&bad)
    );
    // Help shows no empty `[env: NAME=]`.
    let help = eventsource(&["--help"], &[]);
    let help = String::from_utf8_lossy(&help.stdout).into_owned();
    assert!(!help.contains("=]"), "{help}");
    assert!(
        help.contains("--tls-ca-file") && help.contains("REDIS_URL"),
        "{help}"
    );
}

#[tokio::test]
async fn dead_letter_mistakes_are_usage_errors_and_a_cut_list_says_so() {
    let prefix = unique_prefix("cli-dlq-mistakes");
    let _c = Cleanup(prefix.clone());
    let url = redis_url();
    let base = [
        "--url",
        url.as_str(),
        "--prefix",
        prefix.as_str(),
        "--group",
        "billing",
    ];
    let run = |args: &[&str]| {
        let all: Vec<&str> = base.iter().copied().chain(args.iter().copied()).collect();
        eventsource(&all, &[])
    };
    for args in [
        &["dlq", "show", "not-an-id"][..],
        &["dlq", "replay", "12-ab", "--yes"][..],
        &["dlq", "purge", "*", "--yes"][..],
    ] {
        let out = run(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        let said = stderr(&out);
        assert_eq!(said.trim().lines().count(), 1, "one sentence: {said}");
        assert!(said.contains("is not a dead letter id"), "{said}");
    }
    // 25 dead letters of the group, the default page of 20: the list says it is cut.
    let mut conn = eventsource_testsupport::connection(&url).await;
    for i in 0..25 {
        let _: String = redis::cmd("XADD")
            .arg(format!("{prefix}:stream_dlq"))
            .arg("*")
            .arg("event_type")
            .arg("OrderCreated")
            .arg("consumer_group")
            .arg("billing")
            .arg("error")
            .arg(format!("failure {i}"))
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    let list = run(&["dlq", "list"]);
    assert!(list.status.success(), "{}", stderr(&list));
    assert!(
        stderr(&list).contains("showing the oldest 20 of 25 dead letters of group billing"),
        "{}",
        stderr(&list)
    );
    let all = run(&["dlq", "list", "--count", "30"]);
    assert!(!stderr(&all).contains("showing"), "{}", stderr(&all));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_and_the_dashboard_reach_a_tls_only_redis() {
    // No plain port; a client certificate demanded.
    let (_server, dir, port) = eventsource_testsupport::tls_redis(true);
    let file = |name: &str| dir.join(name).display().to_string();
    let url = format!("rediss://localhost:{port}");
    let prefix = unique_prefix("cli-tls");
    let bus = RedisEventBus::new(
        RedisEventBusConfig::default()
            .redis_url(url.clone())
            .stream_prefix(prefix.clone())
            .tls_ca_file(dir.join("ca.crt"))
            .tls_cert_file(dir.join("client.crt"))
            .tls_key_file(dir.join("client.key")),
        registry(),
    )
    .unwrap();
    bus.publish_events(&[created(), created(), created()])
        .await
        .unwrap();

    // Flags.
    let (ca, cert, key) = (file("ca.crt"), file("client.crt"), file("client.key"));
    let tls_flags = [
        "--tls-ca-file",
        ca.as_str(),
        "--tls-cert-file",
        cert.as_str(),
        "--tls-key-file",
        key.as_str(),
    ];
    let mut args = vec!["--url", url.as_str(), "--prefix", prefix.as_str(), "--json"];
    args.extend(tls_flags);
    args.push("info");
    assert_eq!(json(&eventsource(&args, &[]))["stream"]["length"], 3);
    // The library's variables.
    let info = eventsource(
        &["--json", "info"],
        &[
            ("EVENTSOURCE_REDIS_URL", url.as_str()),
            ("EVENTSOURCE_REDIS_STREAM_PREFIX", prefix.as_str()),
            ("EVENTSOURCE_REDIS_TLS_CA_FILE", ca.as_str()),
            ("EVENTSOURCE_REDIS_TLS_CERT_FILE", cert.as_str()),
            ("EVENTSOURCE_REDIS_TLS_KEY_FILE", key.as_str()),
        ],
    );
    assert_eq!(json(&info)["stream"]["length"], 3);
    // Without our CA the server is not trusted: exit 3, saying so.
    let untrusted = eventsource(
        &["--url", url.as_str(), "--prefix", prefix.as_str(), "info"],
        &[],
    );
    assert_eq!(untrusted.status.code(), Some(3), "{}", stderr(&untrusted));

    // The dashboard with the same flags.
    let mut dash_args = vec!["--url", url.as_str(), "--prefix", prefix.as_str()];
    dash_args.extend(tls_flags);
    dash_args.extend(["dashboard", "--listen", "127.0.0.1:0"]);
    let mut child = Command::new(env!("CARGO_BIN_EXE_eventsource"))
        .args(&dash_args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    out.read_line(&mut line).unwrap();
    std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
    let addr = line
        .trim()
        .strip_prefix("dashboard on http://")
        .and_then(|rest| rest.split('/').next())
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_owned();
    let mut s = std::net::TcpStream::connect(&addr).unwrap();
    write!(
        s,
        "GET /api/p/{prefix}/overview HTTP/1.0\r\nHost: {addr}\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    s.read_to_string(&mut response).unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert!(response.starts_with("HTTP/1.0 200"), "{response}");
    let body = response.split_once("\r\n\r\n").unwrap().1;
    let overview: Value = serde_json::from_str(body).unwrap();
    assert_eq!(overview["stream"]["length"], 3, "{overview}");
}

/// `trim --dry-run` names the group (and its pending or unread entries) that holds the stream
/// back, in text and in JSON.
#[tokio::test]
async fn trim_names_the_group_that_holds_the_stream_back() {
    let prefix = unique_prefix("cli-trim-held");
    let _c = Cleanup(prefix.clone());
    let url = redis_url();
    let mut conn = eventsource_testsupport::connection(&url).await;
    let stream = format!("{prefix}:stream");
    for _ in 0..3 {
        let _: String = redis::cmd("XADD")
            .arg(&stream)
            .arg("*")
            .arg("k")
            .arg("v")
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(&stream)
        .arg("billing")
        .arg("0")
        .query_async(&mut conn)
        .await
        .unwrap();
    // Two delivered, not acknowledged; one not delivered.
    let _: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg("billing")
        .arg("w1")
        .arg("COUNT")
        .arg(2)
        .arg("STREAMS")
        .arg(&stream)
        .arg(">")
        .query_async(&mut conn)
        .await
        .unwrap();
    let base = ["--url", url.as_str(), "--prefix", prefix.as_str()];
    let with = |args: &[&str]| {
        let all: Vec<&str> = base.iter().copied().chain(args.iter().copied()).collect();
        eventsource(&all, &[])
    };
    let text = with(&["trim", "--dry-run"]);
    let said = String::from_utf8_lossy(&text.stdout).into_owned();
    assert!(
        said.contains("would remove 0 entries")
            && said.contains("group billing still needs them: 2 pending"),
        "{said}"
    );
    let dry = json(&with(&["--json", "trim", "--dry-run"]));
    let reason = dry["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("group billing"), "{dry}");
}
