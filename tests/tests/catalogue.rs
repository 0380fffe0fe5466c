//! A catalogue of malformed inputs — frames, tasks over gRPC and HTTP, registrations, HTTP
//! requests — each answered with its own clear error while nothing else is disturbed: after
//! every case a good frame still gets the same prediction, the task version has not moved
//! and the workers are still registered. Over the whole run no prediction carries a
//! non-finite score and every frame sent gets exactly one answer. The promises are listed
//! in docs/reliability.md ("Bad input").

use std::collections::{BTreeMap, BTreeSet};

use spotlight_codec::{Codec, MAX_ABS_VALUE};
use spotlight_proto::v1 as pb;
use spotlight_proto::v1::cloud_message::Kind;
use spotlight_tests::*;
use tonic::Code;
use tonic::transport::Channel;

/// The sandbox, one long-lived edge stream, and what the run has seen so far.
struct Catalogue {
    sandbox: Sandbox,
    control: pb::control_client::ControlClient<Channel>,
    registry: pb::registry_client::RegistryClient<Channel>,
    tx: tokio::sync::mpsc::Sender<pb::EdgeMessage>,
    inbound: tonic::Streaming<pb::CloudMessage>,
    /// Backbone features of one test image.
    good: Vec<f32>,
    /// Its prediction under the default task, before any bad input.
    baseline: Option<pb::Prediction>,
    /// Task version expected now.
    version: u64,
    next_seq: u64,
    sent: BTreeSet<u64>,
    answered: BTreeSet<u64>,
    predictions: usize,
    cases: Vec<String>,
}

/// Model categories and segments, for the tasks below.
const CATEGORIES: [&str; 10] = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
];
const SEGMENTS: [&str; 5] = ["tops", "tops.light", "tops.warm", "footwear", "other"];

impl Catalogue {
    async fn start() -> Self {
        let sandbox = SandboxBuilder::new().worker_per_branch().start().await;
        let (images, _) = test_images(1);
        let good = features(&sandbox.model, &images).remove(0);
        let control = sandbox.control().await;
        let registry =
            pb::registry_client::RegistryClient::connect(format!("http://{}", sandbox.grpc))
                .await
                .expect("connect registry");
        let (tx, inbound) = sandbox.open_stream().await;
        let mut c = Self {
            sandbox,
            control,
            registry,
            tx,
            inbound,
            good,
            baseline: None,
            version: 1,
            next_seq: 1, // 0 is left for answers that belong to no frame
            sent: BTreeSet::new(),
            answered: BTreeSet::new(),
            predictions: 0,
            cases: Vec::new(),
        };
        let frame = c.encoded(Codec::Int8, &c.good.clone());
        let answers = c.send(vec![frame]).await;
        match answers.into_values().next() {
            Some(Kind::Prediction(p)) => c.baseline = Some(p),
            other => panic!("the good frame failed: {other:?}"),
        }
        c
    }

    /// A frame with a new seq carrying `values` in `codec`.
    fn encoded(&mut self, codec: Codec, values: &[f32]) -> pb::Frame {
        let seq = self.next_seq;
        self.next_seq += 1;
        match frame(&self.sandbox.model, seq, values, codec).kind {
            Some(pb::edge_message::Kind::Frame(f)) => f,
            _ => unreachable!("frame() builds a frame"),
        }
    }

    /// The good features, int8 as the edge sends them, changed by `f`.
    fn mutated(&mut self, f: impl FnOnce(&mut pb::FeatureTensor)) -> pb::Frame {
        let mut frame = self.encoded(Codec::Int8, &self.good.clone());
        f(frame.features.as_mut().expect("features"));
        frame
    }

    /// The good features with value 5 replaced by `value`, in `codec`.
    fn with_value(&mut self, codec: Codec, value: f32) -> pb::Frame {
        let mut v = self.good.clone();
        v[5] = value;
        self.encoded(codec, &v)
    }

    /// Sends `frames` in one message on the long-lived stream and reads one answer each.
    async fn send(&mut self, frames: Vec<pb::Frame>) -> BTreeMap<u64, Kind> {
        let n = frames.len();
        for f in &frames {
            assert!(self.sent.insert(f.seq), "seq {} reused by the test", f.seq);
        }
        let kind = if n == 1 {
            pb::edge_message::Kind::Frame(frames.into_iter().next().expect("one"))
        } else {
            pb::edge_message::Kind::Frames(pb::FrameBatch { frames })
        };
        self.tx
            .send(pb::EdgeMessage { kind: Some(kind) })
            .await
            .expect("stream open");
        let answers = collect(&mut self.inbound, n).await;
        for (seq, answer) in &answers {
            assert!(
                self.sent.contains(seq),
                "answer for a seq never sent: {seq}"
            );
            assert!(self.answered.insert(*seq), "frame {seq} answered twice");
            if let Kind::Prediction(p) = answer {
                self.predictions += 1;
                assert_finite(p);
            }
        }
        answers
    }

    /// A good frame still gets the baseline prediction under the expected task version,
    /// the task has not moved, and the three workers are still registered.
    async fn undisturbed(&mut self, case: &str) {
        let frame = self.encoded(Codec::Int8, &self.good.clone());
        let seq = frame.seq;
        let answers = self.send(vec![frame]).await;
        self.assert_baseline(case, &answers[&seq]);
        let task = self
            .control
            .get_task(pb::GetTaskRequest {})
            .await
            .expect("get task")
            .into_inner();
        assert_eq!(task.version, self.version, "{case}: the task version moved");
        let workers = self
            .control
            .list_workers(pb::ListWorkersRequest {})
            .await
            .expect("list workers")
            .into_inner()
            .workers;
        assert_eq!(workers.len(), 3, "{case}: workers changed: {workers:?}");
        self.cases.push(case.to_string());
    }

    fn assert_baseline(&self, case: &str, answer: &Kind) {
        let base = self.baseline.as_ref().expect("baseline");
        let Kind::Prediction(p) = answer else {
            panic!("{case}: a good frame failed: {answer:?}")
        };
        assert_eq!(p.task_version, self.version, "{case}");
        assert_eq!(p.top_index, base.top_index, "{case}");
        assert_eq!(p.scores.len(), base.scores.len(), "{case}");
        for (a, b) in p.scores.iter().zip(&base.scores) {
            assert_eq!(a.index, b.index, "{case}");
            assert!((a.score - b.score).abs() < 1e-5, "{case}: {a:?} vs {b:?}");
        }
    }

    /// `bad` between two good frames of one batch: it alone is refused.
    async fn frame_case(&mut self, case: &str, bad: pb::Frame, code: Code, text: &str) {
        let before = self.encoded(Codec::Int8, &self.good.clone());
        let after = self.encoded(Codec::Int8, &self.good.clone());
        let seqs = [before.seq, bad.seq, after.seq];
        let answers = self.send(vec![before, bad, after]).await;
        assert_error(case, &answers[&seqs[1]], code, text);
        self.assert_baseline(case, &answers[&seqs[0]]);
        self.assert_baseline(case, &answers[&seqs[2]]);
        self.undisturbed(case).await;
    }

    /// A task set over gRPC is refused with `code` and `text`; the version stays.
    async fn grpc_task(
        &mut self,
        case: &str,
        categories: &[&str],
        gains: &[(&str, f32)],
    ) -> Status {
        let err = self
            .control
            .set_task(pb::SetTaskRequest {
                categories: categories.iter().map(|s| s.to_string()).collect(),
                gains: gains.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            })
            .await
            .expect_err(case);
        self.undisturbed(case).await;
        Status(err)
    }

    /// An HTTP request answered with `status` and a JSON error containing `text`
    /// (`None`: any body); nothing disturbed.
    async fn http_case(
        &mut self,
        case: &str,
        (method, path, content_type, body): (&str, &str, Option<&str>, &[u8]),
        status: u16,
        text: Option<&str>,
    ) -> HttpReply {
        let reply = http_with(self.sandbox.http, method, path, content_type, body).await;
        assert_eq!(reply.status, status, "{case}: {}", reply.body);
        if let Some(text) = text {
            let json: serde_json::Value = serde_json::from_str(&reply.body)
                .unwrap_or_else(|e| panic!("{case}: body is not JSON ({e}): {}", reply.body));
            let message = json["error"]["message"].as_str().unwrap_or_default();
            assert_eq!(json["error"]["code"], "invalid_argument", "{case}: {json}");
            assert!(
                message.contains(text),
                "{case}: \"{message}\" lacks \"{text}\""
            );
        }
        self.undisturbed(case).await;
        reply
    }

    /// A registration refused with `code` and `text`.
    async fn register_case(&mut self, case: &str, r: pb::RegisterRequest, code: Code, text: &str) {
        let err = self.registry.register(r).await.expect_err(case);
        Status(err).is(case, code, text);
        self.undisturbed(case).await;
    }
}

/// A refusal to check.
struct Status(tonic::Status);

impl Status {
    fn is(&self, case: &str, code: Code, text: &str) {
        assert_eq!(self.0.code(), code, "{case}: {}", self.0.message());
        assert!(
            self.0.message().contains(text),
            "{case}: \"{}\" lacks \"{text}\"",
            self.0.message()
        );
    }
}

fn assert_error(case: &str, answer: &Kind, code: Code, text: &str) {
    match answer {
        Kind::Error(e) => {
            assert_eq!(e.code, code as i32, "{case}: {}", e.message);
            assert!(
                e.message.contains(text),
                "{case}: \"{}\" lacks \"{text}\"",
                e.message
            );
        }
        other => panic!("{case}: expected a {code:?} error, got {other:?}"),
    }
}

fn assert_finite(p: &pb::Prediction) {
    assert!(!p.scores.is_empty(), "prediction without scores: {p:?}");
    for s in &p.scores {
        assert!(
            s.score.is_finite() && s.logit.is_finite(),
            "frame {} carries a non-finite score: {p:?}",
            p.seq
        );
    }
    assert_eq!(
        p.top_index, p.scores[0].index,
        "top is the best score: {p:?}"
    );
}

fn register(worker_id: &str, endpoint: &str, segments: &[&str], hash: &str) -> pb::RegisterRequest {
    pb::RegisterRequest {
        worker_id: worker_id.into(),
        endpoint: endpoint.into(),
        segments: segments.iter().map(|s| s.to_string()).collect(),
        model_hash: hash.into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_malformed_input_gets_a_clear_error_and_disturbs_nothing() {
    let mut c = Catalogue::start().await;
    let hash = c.sandbox.model.hash().to_string();
    let bad = Code::InvalidArgument;

    // ── Frames on the Inference stream: one bad frame between two good ones ──
    let f = c.mutated(|t| t.codec = 0);
    c.frame_case(
        "codec unspecified",
        f,
        bad,
        "unknown codec 0; expected 1 (f32), 2 (f16), 3 (int8), 4 (int8_per_channel) or 5 (int4_per_channel)",
    )
    .await;
    let f = c.mutated(|t| t.codec = 9);
    c.frame_case("codec out of the enum", f, bad, "unknown codec 9")
        .await;
    let f = c.mutated(|t| t.shape = vec![1, 8, 7, 8]);
    c.frame_case(
        "wrong shape",
        f,
        bad,
        "shape [1, 8, 7, 8]; model fashion-mnist-nested expects [1, 8, 7, 7]",
    )
    .await;
    let f = c.mutated(|t| t.shape = vec![]);
    c.frame_case(
        "no shape",
        f,
        bad,
        "shape []; model fashion-mnist-nested expects",
    )
    .await;
    let f = c.mutated(|t| t.data.truncate(391));
    c.frame_case(
        "one byte short",
        f,
        bad,
        "has 391 bytes; Int8 of 392 values needs 392",
    )
    .await;
    let f = c.mutated(|t| {
        t.codec = Codec::F32.wire();
        t.data = Default::default();
    });
    c.frame_case(
        "empty data",
        f,
        bad,
        "has 0 bytes; F32 of 392 values needs 1568",
    )
    .await;
    let mut f = c.encoded(Codec::Int8, &c.good.clone());
    f.features = None;
    c.frame_case("no feature tensor", f, bad, "frame has no feature tensor")
        .await;
    let f = c.mutated(|t| t.data = vec![7u8; 5 << 20].into());
    c.frame_case(
        "5 MiB frame",
        f,
        bad,
        "has 5242880 bytes; Int8 of 392 values needs 392",
    )
    .await;
    let f = c.with_value(Codec::F32, f32::NAN);
    c.frame_case(
        "f32 NaN",
        f,
        bad,
        "feature value 5 is NaN; values must be finite",
    )
    .await;
    let f = c.with_value(Codec::F32, f32::INFINITY);
    c.frame_case(
        "f32 +inf",
        f,
        bad,
        "feature value 5 is inf; values must be finite",
    )
    .await;
    let f = c.with_value(Codec::F32, f32::NEG_INFINITY);
    c.frame_case(
        "f32 -inf",
        f,
        bad,
        "feature value 5 is -inf; values must be finite",
    )
    .await;
    let f = c.with_value(Codec::F32, 1e30);
    c.frame_case(
        "f32 1e30 (overflows the branches)",
        f,
        bad,
        "values must lie within ±10000",
    )
    .await;
    let f = c.with_value(Codec::F32, -1.5e4);
    c.frame_case(
        "f32 just beyond the bound",
        f,
        bad,
        "feature value 5 is -15000; values must lie within ±10000",
    )
    .await;
    let f = c.with_value(Codec::F16, f32::NAN);
    c.frame_case("f16 NaN", f, bad, "feature value 5 is NaN")
        .await;
    let f = c.with_value(Codec::F16, f32::INFINITY);
    c.frame_case("f16 inf", f, bad, "feature value 5 is inf")
        .await;
    let f = c.with_value(Codec::F16, 60000.0);
    c.frame_case(
        "f16 60000",
        f,
        bad,
        "feature value 5 is 60000; values must lie within ±10000",
    )
    .await;
    let f = c.mutated(|t| t.scale = f32::NAN);
    c.frame_case(
        "int8 scale NaN",
        f,
        bad,
        "int8 scale must be finite and > 0, got NaN",
    )
    .await;
    let f = c.mutated(|t| t.scale = 0.0);
    c.frame_case(
        "int8 scale 0",
        f,
        bad,
        "int8 scale must be finite and > 0, got 0",
    )
    .await;
    let f = c.mutated(|t| t.scale = -0.01);
    c.frame_case(
        "int8 scale negative",
        f,
        bad,
        "int8 scale must be finite and > 0, got -0.01",
    )
    .await;
    let f = c.mutated(|t| t.scale = 1e30);
    c.frame_case(
        "int8 scale 1e30",
        f,
        bad,
        "int8 scale 1000000000000000000000000000000 with zero_point",
    )
    .await;
    let f = c.mutated(|t| t.zero_point = f32::INFINITY);
    c.frame_case(
        "int8 zero point inf",
        f,
        bad,
        "int8 zero_point must be finite and within [0, 255], got inf",
    )
    .await;
    let f = c.mutated(|t| t.zero_point = -1e6);
    c.frame_case(
        "int8 zero point -1e6",
        f,
        bad,
        "int8 zero_point must be finite and within [0, 255], got -1000000",
    )
    .await;

    // A batch over the limit: every one of its frames is answered, none is run.
    let frames: Vec<pb::Frame> = (0..4097)
        .map(|_| c.encoded(Codec::Int8, &c.good.clone()))
        .collect();
    let answers = c.send(frames).await;
    for a in answers.values() {
        assert_error(
            "4097-frame batch",
            a,
            bad,
            "a frame batch holds at most 4096 frames, got 4097; none of them was run",
        );
    }
    c.undisturbed("4097-frame batch").await;

    // Messages that are not frames get one error (seq 0, which no frame uses).
    for (case, kind) in [
        (
            "second hello",
            Some(pb::edge_message::Kind::Hello(pb::Hello::default())),
        ),
        ("empty message", None),
    ] {
        c.tx.send(pb::EdgeMessage { kind })
            .await
            .expect("stream open");
        let answers = collect(&mut c.inbound, 1).await;
        assert_error(
            case,
            &answers[&0],
            bad,
            "expected a frame; hello may only be sent once",
        );
        c.undisturbed(case).await;
    }

    // Streams that do not start with a valid hello are refused whole.
    let first = c.encoded(Codec::Int8, &c.good.clone());
    c.sent.remove(&first.seq); // refused with the stream, never answered alone
    for (case, first, code, text) in [
        (
            "frame before hello",
            Some(pb::EdgeMessage {
                kind: Some(pb::edge_message::Kind::Frame(first)),
            }),
            bad,
            "the first message of a stream must be hello",
        ),
        (
            "stream closed before hello",
            None,
            bad,
            "stream closed before hello",
        ),
        (
            "hello for another model",
            Some(hello("sha256:0000")),
            Code::FailedPrecondition,
            "runs model sha256:0000, but this coordinator serves",
        ),
    ] {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        if let Some(m) = first {
            tx.send(m).await.expect("queue");
        }
        drop(tx);
        let err = c
            .sandbox
            .inference()
            .await
            .stream(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .expect_err(case);
        Status(err).is(case, code, text);
        c.undisturbed(case).await;
    }

    // ── Tasks over gRPC Control: refused, the version does not move ──
    let gain_range = |key: &str, got: &str| {
        format!("gain for \"{key}\" must be a finite number in [0, 1000], got {got}")
    };
    c.grpc_task("unknown category", &["Sneaker", "Sneakers"], &[])
        .await
        .is(
            "unknown category",
            bad,
            "unknown category \"Sneakers\"; known: T-shirt/top, Trouser",
        );
    c.grpc_task("empty category name", &[""], &[]).await.is(
        "empty category name",
        bad,
        "unknown category \"\"; known: T-shirt/top",
    );
    c.grpc_task("category twice", &["Bag", "Sneaker", "Bag"], &[])
        .await
        .is("category twice", bad, "category \"Bag\" is listed twice");
    let eleven: Vec<&str> = CATEGORIES.iter().chain(&["Bag"]).copied().collect();
    c.grpc_task("11 categories", &eleven, &[]).await.is(
        "11 categories",
        bad,
        "task lists 11 categories; the model has 10, each may be listed once",
    );
    let long = "x".repeat(5000);
    c.grpc_task("5000-byte name", &[long.as_str()], &[])
        .await
        .is(
            "5000-byte name",
            bad,
            "is 5000 bytes; names are at most 128",
        );
    c.grpc_task("gain NaN", &[], &[("Bag", f32::NAN)]).await.is(
        "gain NaN",
        bad,
        &gain_range("Bag", "NaN"),
    );
    c.grpc_task("gain +inf", &[], &[("footwear", f32::INFINITY)])
        .await
        .is("gain +inf", bad, &gain_range("footwear", "inf"));
    c.grpc_task("gain negative", &[], &[("footwear", -1.0)])
        .await
        .is("gain negative", bad, &gain_range("footwear", "-1"));
    c.grpc_task("gain 1e30", &[], &[("tops", 1e30)]).await.is(
        "gain 1e30",
        bad,
        &gain_range("tops", "1000000000000000000000000000000"),
    );
    c.grpc_task("gain just over the limit", &[], &[("Bag", 1000.5)])
        .await
        .is(
            "gain just over the limit",
            bad,
            &gain_range("Bag", "1000.5"),
        );
    c.grpc_task(
        "segment gains overflowing along a path",
        &[],
        &[("tops", 1000.0), ("tops.light", 1000.0)],
    )
    .await
    .is(
        "path gains",
        bad,
        "segment gains along tops=1000 → tops.light=1000 multiply to 1000000; at most 10000",
    );
    c.grpc_task("unknown gain target", &[], &[("zzz", 2.0)])
        .await
        .is(
            "unknown gain target",
            bad,
            "unknown gain target \"zzz\"; expected a category (T-shirt/top",
        );
    c.grpc_task("empty gain key", &[], &[("", 2.0)]).await.is(
        "empty gain key",
        bad,
        "unknown gain target \"\"",
    );
    let sixteen: Vec<(String, f32)> = (0..16).map(|i| (format!("k{i}"), 1.0)).collect();
    let sixteen: Vec<(&str, f32)> = sixteen.iter().map(|(k, v)| (k.as_str(), *v)).collect();
    c.grpc_task("16 gains", &[], &sixteen).await.is(
        "16 gains",
        bad,
        "task has 16 gains; at most 15 (one per category or segment)",
    );
    c.grpc_task("everything cut out", &["Sandal"], &[("footwear", 0.0)])
        .await
        .is(
            "everything cut out",
            bad,
            "task leaves no category to predict",
        );

    // ── Tasks over HTTP JSON: 400 with a JSON error, the version does not move ──
    let json = Some("application/json");
    let like = "task must be JSON like {\"categories\": [\"Sneaker\"]";
    for (case, content_type, body, text) in [
        ("malformed JSON", json, r#"{"categories": ["#, like),
        ("empty body", json, "", "EOF while parsing"),
        (
            "a JSON array",
            json,
            "[]",
            "invalid type: sequence, expected a task object like",
        ),
        (
            "categories as a string",
            json,
            r#"{"categories": "Bag"}"#,
            "invalid type: string \"Bag\", expected a sequence",
        ),
        (
            "gain as a string",
            json,
            r#"{"gains": {"Bag": "2"}}"#,
            "invalid type: string \"2\", expected f32",
        ),
        (
            "gain null",
            json,
            r#"{"gains": {"Bag": null}}"#,
            "invalid type: null, expected f32",
        ),
        (
            "unknown field",
            json,
            r#"{"category": ["Bag"]}"#,
            "unknown field `category`",
        ),
        (
            "gain key twice",
            json,
            r#"{"gains": {"Bag": 2, "Bag": 3}}"#,
            "gain for \"Bag\" is given twice",
        ),
        (
            "gain overflowing f32",
            json,
            r#"{"gains": {"Bag": 1e39}}"#,
            "gain for \"Bag\" must be a finite number in [0, 1000], got inf",
        ),
        (
            "gain negative",
            json,
            r#"{"gains": {"footwear": -0.5}}"#,
            "must be a finite number in [0, 1000], got -0.5",
        ),
        (
            "unknown category",
            json,
            r#"{"categories": ["Sneakers"]}"#,
            "unknown category \"Sneakers\"; known:",
        ),
        (
            "category twice",
            json,
            r#"{"categories": ["Bag", "Bag"]}"#,
            "category \"Bag\" is listed twice",
        ),
        (
            "form-encoded body",
            Some("application/x-www-form-urlencoded"),
            "categories=Bag",
            like,
        ),
        ("text body, no content type", None, "Bag please", like),
    ] {
        c.http_case(
            case,
            ("PUT", "/v1/task", content_type, body.as_bytes()),
            400,
            Some(text),
        )
        .await;
    }

    // ── Registrations over gRPC Registry: refused, the three workers stay ──
    let here = "http://127.0.0.1:1";
    c.register_case(
        "empty worker id",
        register("", here, &["footwear"], &hash),
        bad,
        "worker id is empty",
    )
    .await;
    c.register_case(
        "unknown segment",
        register("w", here, &["shoes"], &hash),
        bad,
        "worker \"w\" hosts unknown segment \"shoes\"; known: tops, tops.light",
    )
    .await;
    c.register_case(
        "no segment",
        register("w", here, &[], &hash),
        bad,
        "worker \"w\" hosts no segment",
    )
    .await;
    c.register_case(
        "another model",
        register("w", here, &["footwear"], "sha256:0000"),
        Code::FailedPrecondition,
        "worker \"w\" runs model sha256:0000",
    )
    .await;
    c.register_case(
        "endpoint not a URL",
        register("w", "not a url", &["footwear"], &hash),
        bad,
        "bad worker endpoint from \"w\": \"not a url\" must start with http:// or https://",
    )
    .await;
    let err = c
        .registry
        .heartbeat(pb::HeartbeatRequest {
            lease_id: 1,
            worker_id: "w".into(),
        })
        .await
        .expect_err("heartbeat");
    Status(err).is(
        "heartbeat of an unknown lease",
        Code::NotFound,
        "lease 1 is unknown or expired; register again",
    );
    c.undisturbed("heartbeat of an unknown lease").await;
    let err = c
        .registry
        .deregister(pb::DeregisterRequest { lease_id: 1 })
        .await
        .expect_err("deregister");
    Status(err).is(
        "deregister of an unknown lease",
        Code::NotFound,
        "lease 1 is unknown",
    );
    c.undisturbed("deregister of an unknown lease").await;

    // ── HTTP requests the API does not serve ──
    c.http_case("unknown path", ("GET", "/v1/nothing", None, b""), 404, None)
        .await;
    let reply = c
        .http_case("wrong method", ("DELETE", "/v1/task", None, b""), 405, None)
        .await;
    assert!(
        reply.headers.contains("allow: get,head,put,post"),
        "{}",
        reply.headers
    );
    let big = vec![b' '; (2 << 20) + 1];
    let reply = c
        .http_case(
            "body over 2 MiB",
            ("PUT", "/v1/task", json, &big),
            413,
            None,
        )
        .await;
    assert!(
        reply.body.contains("length limit exceeded"),
        "{}",
        reply.body
    );
    let reply = c
        .http_case(
            "watch with a bad version",
            ("GET", "/v1/task/watch?after=abc", None, b""),
            400,
            None,
        )
        .await;
    assert!(
        reply.body.contains("after: invalid digit"),
        "{}",
        reply.body
    );

    // ── At the limits everything still works, with finite scores ──
    let mut gains: Vec<(String, f32)> =
        CATEGORIES.iter().map(|k| (k.to_string(), 1000.0)).collect();
    gains.extend(SEGMENTS.iter().map(|s| (s.to_string(), 100.0)));
    let task = c
        .control
        .set_task(pb::SetTaskRequest {
            categories: vec![],
            gains: gains.into_iter().collect(),
        })
        .await
        .expect("15 gains, each at its limit, paths multiplying to 1e4");
    assert_eq!(task.get_ref().version, 2);
    let scale = 0.999 * MAX_ABS_VALUE / c.good.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let loud: Vec<f32> = c.good.iter().map(|v| v * scale).collect();
    let frames = vec![
        c.encoded(Codec::F32, &loud),
        c.encoded(Codec::Int8, &loud),
        c.encoded(Codec::F16, &loud),
    ];
    let answers = c.send(frames).await;
    for a in answers.values() {
        let Kind::Prediction(p) = a else {
            panic!("features at ±1e4 under gains at the limit failed: {a:?}")
        };
        assert_eq!(p.task_version, 2);
    }
    c.control
        .set_task(pb::SetTaskRequest::default())
        .await
        .expect("back to every category");
    c.version = 3;
    c.undisturbed("back to the default task").await;

    // ── Over the whole run ──
    assert_eq!(
        c.answered, c.sent,
        "every frame sent got exactly one answer"
    );
    assert!(
        c.predictions > c.cases.len(),
        "{} predictions",
        c.predictions
    );
    let malformed = c.cases.len() - 1; // all but the last check above
    assert!(malformed >= 30, "only {malformed} malformed inputs");
    eprintln!(
        "catalogue: {malformed} malformed inputs, {} frames answered, {} predictions, none with a non-finite score",
        c.answered.len(),
        c.predictions
    );
    c.sandbox.stop().await;
}
