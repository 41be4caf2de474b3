//! `eventsource`: the operator's view of a Redis event bus.
//!
//! ```text
//! eventsource [--url URL] [--prefix P] [--group G] [--json] COMMAND
//!
//! COMMANDS
//!   info                 stream length, groups, pending and dead-letter counts
//!   health               healthy / degraded / unhealthy (exit 0 only when Redis answers)
//!   pending [N]          the oldest N pending entries of the group: owner, idle, deliveries
//!   dlq list [N]         the oldest N dead letters: type, event id, retries, group, reason
//!   dlq show ID          every field of one dead letter
//!   dlq replay ID...     put dead letters back on the stream (for the group that failed them)
//!   dlq replay --all     replay every dead letter
//!   trim                 remove the entries every consumer group has acknowledged
//! ```
//!
//! Options default to the `EVENTSOURCE_REDIS_*` environment variables (see
//! `RedisEventBusConfig::from_env`). The exit code is 0 on success, 1 when a dead letter to
//! replay does not exist or Redis is unhealthy, 2 on a usage or connection error.

#![forbid(unsafe_code)]

use std::process::ExitCode;

use eventsource_core::EventRegistry;
use eventsource_redis::{RedisEventBus, RedisEventBusConfig};

const USAGE: &str = "usage: eventsource [--url URL] [--prefix P] [--group G] [--json] \
(info | health | pending [N] | dlq list [N] | dlq show ID | dlq replay (ID... | --all) | trim)";

struct Args {
    json: bool,
    command: Vec<String>,
    config: RedisEventBusConfig,
}

fn parse(args: Vec<String>) -> Result<Args, String> {
    let mut config = RedisEventBusConfig::from_env().map_err(|e| e.to_string())?;
    let mut json = false;
    let mut command = Vec::new();
    let mut it = args.into_iter();
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().ok_or(format!("{name} needs a value"));
        match arg.as_str() {
            "--url" => config.redis_url = value("--url")?,
            "--prefix" => config.stream_prefix = value("--prefix")?,
            "--group" => config.consumer_group = value("--group")?,
            "--json" => json = true,
            "-h" | "--help" => return Err(USAGE.to_owned()),
            _ => command.push(arg),
        }
    }
    // The operator tool is not a consumer: give it a recognisable name.
    config.consumer_name = Some("eventsource-cli".to_owned());
    Ok(Args {
        json,
        command,
        config,
    })
}

fn count(arg: Option<&String>, default: usize) -> Result<usize, String> {
    arg.map_or(Ok(default), |s| {
        s.parse().map_err(|_| format!("{s:?} is not a count"))
    })
}

fn print_json(value: &impl serde::Serialize) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    );
}

async fn run(args: Args) -> Result<ExitCode, String> {
    let bus = RedisEventBus::new(args.config, EventRegistry::new()).map_err(|e| e.to_string())?;
    let cmd: Vec<&str> = args.command.iter().map(String::as_str).collect();
    match cmd.as_slice() {
        ["info"] => {
            let info = bus.try_stream_info().await.map_err(|e| e.to_string())?;
            if args.json {
                print_json(&info);
            } else {
                println!("stream        {}", info.stream.name);
                println!("length        {}", info.stream.length);
                println!(
                    "entries       {} .. {}",
                    info.stream.first_entry_id.as_deref().unwrap_or("-"),
                    info.stream.last_entry_id.as_deref().unwrap_or("-")
                );
                println!(
                    "pending       {} (group {})",
                    info.pending_messages,
                    bus.config().consumer_group
                );
                println!(
                    "dead letters  {} ({})",
                    info.dlq_messages,
                    bus.dlq_stream_name()
                );
                println!("consumers     {}", info.active_consumers);
                for g in &info.consumer_groups {
                    println!(
                        "  group {:<24} consumers {:<4} pending {:<8} lag {}",
                        g.name,
                        g.consumers,
                        g.pending,
                        g.lag.map_or("-".to_owned(), |l| l.to_string())
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        ["health"] => {
            let health = bus.health_check().await;
            if args.json {
                print_json(&health);
            } else {
                println!(
                    "{} (connected {}, pending {}, dead letters {}){}",
                    health.status,
                    health.connected,
                    health.pending_messages,
                    health.dlq_messages,
                    health
                        .error
                        .as_deref()
                        .map(|e| format!(": {e}"))
                        .unwrap_or_default()
                );
            }
            Ok(if health.connected {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        ["pending", rest @ ..] => {
            let n = count(rest.first().map(|s| (*s).to_owned()).as_ref(), 20)?;
            let entries = bus.pending_entries(n).await.map_err(|e| e.to_string())?;
            if args.json {
                print_json(&entries);
            } else {
                println!(
                    "{:<22} {:<28} {:>12} {:>10}",
                    "message id", "consumer", "idle ms", "deliveries"
                );
                for e in &entries {
                    println!(
                        "{:<22} {:<28} {:>12} {:>10}",
                        e.message_id, e.consumer, e.idle_ms, e.deliveries
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        ["dlq", "list", rest @ ..] => {
            let n = count(rest.first().map(|s| (*s).to_owned()).as_ref(), 20)?;
            let letters = bus.get_dlq_messages(n).await.map_err(|e| e.to_string())?;
            if args.json {
                print_json(&letters);
            } else {
                println!(
                    "{:<22} {:<20} {:<36} {:>7} {:<16} reason",
                    "dlq id", "event type", "event id", "retries", "group"
                );
                for l in &letters {
                    println!(
                        "{:<22} {:<20} {:<36} {:>7} {:<16} {}",
                        l.message_id,
                        l.event_type().unwrap_or("-"),
                        l.get("event_id").unwrap_or("-"),
                        l.retry_count().map_or("-".to_owned(), |r| r.to_string()),
                        l.consumer_group().unwrap_or("-"),
                        l.error().unwrap_or("(not recorded)")
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        ["dlq", "show", id] => {
            let letter = bus
                .get_dlq_messages_range(id, id, 1)
                .await
                .map_err(|e| e.to_string())?
                .into_iter()
                .next();
            match letter {
                Some(l) if args.json => print_json(&l),
                Some(l) => {
                    println!("dlq id  {}", l.message_id);
                    for (k, v) in &l.fields_lossy() {
                        println!("{k:<20} {v}");
                    }
                }
                None => {
                    eprintln!("no dead letter with id {id}");
                    return Ok(ExitCode::from(1));
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        ["dlq", "replay", "--all"] => {
            let mut replayed = 0usize;
            loop {
                let batch = bus.get_dlq_messages(100).await.map_err(|e| e.to_string())?;
                if batch.is_empty() {
                    break;
                }
                for l in batch {
                    if bus
                        .replay_dlq_message(&l.message_id)
                        .await
                        .map_err(|e| e.to_string())?
                    {
                        replayed += 1;
                    }
                }
            }
            println!("replayed {replayed} dead letter(s)");
            Ok(ExitCode::SUCCESS)
        }
        ["dlq", "replay", ids @ ..] if !ids.is_empty() => {
            let mut missing = 0;
            for id in ids {
                if bus
                    .replay_dlq_message(id)
                    .await
                    .map_err(|e| e.to_string())?
                {
                    println!("replayed {id}");
                } else {
                    eprintln!("no dead letter with id {id}");
                    missing += 1;
                }
            }
            Ok(if missing == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        ["trim"] => {
            let report = bus.trim_acknowledged().await.map_err(|e| e.to_string())?;
            if args.json {
                print_json(&report);
            } else {
                match &report.reason {
                    Some(why) => println!("nothing trimmed: {why}"),
                    None => println!(
                        "removed {} entries before {} (acknowledged by every group)",
                        report.removed,
                        report.min_id.as_deref().unwrap_or("-")
                    ),
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        _ => Err(USAGE.to_owned()),
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args = match parse(std::env::args().skip(1).collect()) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    match run(args).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}
