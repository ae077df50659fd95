//! `make run`'s tour of the guards: one call each for the deadline default,
//! a call cut at its deadline, a message over the size limit, and a keyed
//! retry, each said in plain words with what proves it (the client's status,
//! the service's execution count, the replay mark). The configuration it
//! expects is `envoy/demo-plugin-config.json`.

use std::fmt;
use std::time::{Duration, Instant};

use tonic::metadata::MetadataValue;
use tonic::transport::Channel;
use tonic::{Code, Request};

use crate::pb::demo_client::DemoClient;
use crate::pb::EchoRequest;

/// The demo configuration's limit on a request message, bytes.
pub const DEMO_MESSAGE_LIMIT: usize = 4096;
/// The demo configuration's default deadline.
pub const DEMO_DEFAULT_DEADLINE: Duration = Duration::from_secs(5);
/// The deadline the slow call is sent with, and how long the service takes.
const CUT_AFTER: Duration = Duration::from_millis(200);
const SLOW_MS: u32 = 600;

/// One guard at work: what was sent, what came back, how many times the
/// service ran, and the sentence that says it.
#[derive(Clone, Debug)]
pub struct Shown {
    pub guard: &'static str,
    pub code: Code,
    /// Upstream executions of Echo the call caused.
    pub executions: u64,
    pub replayed: bool,
    pub elapsed: Duration,
    pub sentence: String,
}

impl fmt::Display for Shown {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:<9} {}", self.guard, self.sentence)
    }
}

/// One call made for `guard`: what came back and how many times the service
/// ran meanwhile; the sentence is the caller's to write.
async fn attempt(
    client: &DemoClient<Channel>,
    guard: &'static str,
    request: Request<EchoRequest>,
    executions: &impl Fn() -> u64,
) -> Shown {
    let before = executions();
    let started = Instant::now();
    let (code, replayed) = match client.clone().echo(request).await {
        Ok(r) => (Code::Ok, r.metadata().get(REPLAYED).is_some()),
        Err(s) => (s.code(), s.metadata().get(REPLAYED).is_some()),
    };
    Shown {
        guard,
        code,
        executions: executions() - before,
        replayed,
        elapsed: started.elapsed(),
        sentence: String::new(),
    }
}

/// The header grpc-guard marks a replayed answer with.
const REPLAYED: &str = "grpc-guard-replayed";

/// Runs the tour on `channel`; `executions` reads the service's count of Echo
/// runs (the demo service's own counter).
pub async fn guards(channel: &Channel, executions: impl Fn() -> u64) -> Vec<Shown> {
    let client = crate::client(channel.clone());
    let echo = |message: &str| EchoRequest { message: message.to_owned(), ..EchoRequest::default() };

    // A call without grpc-timeout runs under the default deadline.
    let mut deadline = attempt(&client, "deadline", Request::new(echo("no deadline")), &executions).await;
    deadline.sentence = format!(
        "Echo sent without grpc-timeout -> {:?}: grpc-guard gave it the default deadline of {} s (its log line: \
         deadline_source=default)",
        deadline.code,
        DEMO_DEFAULT_DEADLINE.as_secs()
    );

    // A slow call cut at its deadline: the client is told, the service's
    // late work is counted.
    let mut slow = Request::new(EchoRequest { delay_ms: SLOW_MS, ..echo("slow") });
    let timeout = format!("{}m", CUT_AFTER.as_millis());
    slow.metadata_mut().insert("grpc-timeout", MetadataValue::try_from(timeout.as_str()).expect("digits and m"));
    let mut late = attempt(&client, "late", slow, &executions).await;
    late.sentence = format!(
        "Echo with a {} ms deadline on a service that takes {SLOW_MS} ms -> {:?} after {} ms (Envoy answers \
         DeadlineExceeded; tonic's own timer, armed from the same header, may cancel first); the service worked on \
         for nobody: grpc_server_late_responses_total counts it",
        CUT_AFTER.as_millis(),
        late.code,
        late.elapsed.as_millis()
    );

    // A message over the limit never reaches the service.
    let big = echo(&"x".repeat(DEMO_MESSAGE_LIMIT * 2));
    let mut size = attempt(&client, "size", Request::new(big), &executions).await;
    size.sentence = format!(
        "Echo with an {} KB message, over the {} KB limit -> {:?}; the service ran it {} times",
        DEMO_MESSAGE_LIMIT * 2 / 1024,
        DEMO_MESSAGE_LIMIT / 1024,
        size.code,
        size.executions
    );

    // A retry with the same idempotency key gets the first answer again.
    let keyed = || {
        let mut r = Request::new(echo("create order 1"));
        r.metadata_mut().insert("idempotency-key", MetadataValue::from_static("demo-order-1"));
        // The key is scoped to its caller: the demo calls as one.
        r.metadata_mut().insert("authorization", MetadataValue::from_static("Bearer demo-caller"));
        r
    };
    let first = attempt(&client, "dedup", keyed(), &executions).await;
    let mut dedup = attempt(&client, "dedup", keyed(), &executions).await;
    // Both calls count: the service ran the key's work this many times.
    dedup.executions += first.executions;
    dedup.sentence = format!(
        "Echo with Idempotency-Key: demo-order-1, then its retry -> {:?}, {:?}{}; the service ran it {} time{}",
        first.code,
        dedup.code,
        if dedup.replayed { " (replayed: grpc-guard-replayed: true)" } else { "" },
        dedup.executions,
        if dedup.executions == 1 { "" } else { "s" }
    );
    vec![deadline, late, size, dedup]
}
