//! Edge agent configuration: deserialised from the layered config, then validated once.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use spotlight_codec::{Codec, Compression};

use crate::EdgeError;

/// Most copies of a message the edge sends over QUIC (`quic_copies`).
pub const MAX_QUIC_COPIES: usize = 4;

/// Everything the edge agent needs besides the model package.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EdgeConfig {
    /// Coordinator endpoint, e.g. `http://127.0.0.1:7000`; several, comma-separated, for
    /// coordinator replicas: the edge uses the first and moves to the next whenever the
    /// stream breaks (re-sending the unanswered frames there).
    pub coordinator: String,
    /// How frames travel: `grpc` (HTTP/2 over TCP) or `quic` (UDP, to the same address; a
    /// lost packet delays only the frames it carries).
    pub transport: Transport,
    /// QUIC: frames per QUIC stream. Each frame on its own stream (1) means a lost packet
    /// delays one frame; more frames per stream cost less per frame.
    pub quic_stream_frames: usize,
    /// QUIC: copies of every message, each on a stream of its own and each started
    /// `quic_copy_gap_ms` after the previous one, so that they travel in different packets.
    /// The first answer wins; the coordinator routes a frame once however many copies
    /// arrive. 2 means a frame waits for a retransmission only when both copies (or both
    /// answers) are lost, at twice the bytes on the link. 1 (the default) sends one copy.
    pub quic_copies: usize,
    /// QUIC: milliseconds between the copies of a message.
    pub quic_copy_gap_ms: u64,
    /// Transport benchmarks: run the backbone over every input before sending any, and time
    /// each frame from when it is sent, so that the edge's own compute stays out of the
    /// latency. Needs a dataset source and no local API. Off by default.
    pub precompute: bool,
    /// Free-form identifier of this device, sent in the hello.
    pub edge_id: String,
    /// Codec of the feature tensors on the wire (announced in the hello).
    pub codec: Codec,
    /// Lossless stage over each frame's bytes, where it makes the frame smaller (announced
    /// in the hello).
    pub compression: Compression,
    /// Where images come from.
    pub source: SourceConfig,
    /// Stop after this many inputs of the dataset source.
    pub limit: Option<u64>,
    /// Frames sent but not yet answered, at most.
    pub max_in_flight: usize,
    /// Images run through the backbone together when several are queued.
    pub batch_size: usize,
    /// Intra-op threads of the backbone session.
    pub backbone_threads: usize,
    /// JSON lines output: a file path, `-` for stdout, or none.
    pub output: Option<String>,
    /// Print only the last N records to stdout when done.
    pub print_tail: Option<usize>,
    /// Reconnection policy.
    pub reconnect: ReconnectConfig,
    /// Address of the local device API (`POST /v1/classify`); none disables it.
    pub listen: Option<SocketAddr>,
    /// After shutdown is requested, how long to wait for in-flight answers.
    pub drain_timeout_ms: u64,
    /// With frames in flight and no answer for this long, the stream is treated as broken:
    /// reconnect and re-send the unanswered frames.
    pub answer_timeout_ms: u64,
}

impl Default for EdgeConfig {
    fn default() -> Self {
        Self {
            coordinator: "http://127.0.0.1:7000".into(),
            transport: Transport::Grpc,
            quic_stream_frames: 1,
            quic_copies: 1,
            quic_copy_gap_ms: 2,
            precompute: false,
            edge_id: "edge".into(),
            codec: Codec::Int8,
            compression: Compression::None,
            source: SourceConfig::None,
            limit: None,
            max_in_flight: 64,
            batch_size: 16,
            backbone_threads: 1,
            output: None,
            print_tail: None,
            reconnect: ReconnectConfig::default(),
            listen: None,
            drain_timeout_ms: 5_000,
            answer_timeout_ms: 30_000,
        }
    }
}

/// The transport between edge and coordinator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// gRPC: one HTTP/2 stream over TCP.
    #[default]
    Grpc,
    /// QUIC: each message on a QUIC stream of its own.
    Quic,
}

/// Where the edge agent reads images from.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum SourceConfig {
    /// Fashion-MNIST style idx files (gzip or plain).
    Idx {
        /// `*-images-idx3-ubyte[.gz]`.
        images: PathBuf,
        /// `*-labels-idx1-ubyte[.gz]`; label index = category index.
        #[serde(default)]
        labels: Option<PathBuf>,
    },
    /// A folder of PNG/JPEG images, searched recursively; the parent directory name is the
    /// label when it names a category.
    Folder {
        /// The folder.
        path: PathBuf,
    },
    /// No dataset; only the local API (if any) feeds the pipeline.
    None,
}

/// Exponential backoff between connection attempts.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReconnectConfig {
    /// Wait before the first retry.
    pub initial_backoff_ms: u64,
    /// Upper bound of the wait.
    pub max_backoff_ms: u64,
    /// Consecutive failed attempts before giving up.
    pub max_attempts: u32,
}

impl Default for ReconnectConfig {
    fn default() -> Self {
        Self {
            initial_backoff_ms: 100,
            max_backoff_ms: 5_000,
            max_attempts: 10,
        }
    }
}

impl ReconnectConfig {
    /// Wait before retry number `attempt` (1-based): doubles from the initial backoff, capped.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let shift = attempt.saturating_sub(1).min(30);
        let ms = self
            .initial_backoff_ms
            .saturating_mul(1u64 << shift)
            .min(self.max_backoff_ms);
        Duration::from_millis(ms)
    }
}

impl EdgeConfig {
    /// The coordinator endpoints, in the order they are tried (never empty after
    /// [`EdgeConfig::validate`]).
    pub fn coordinators(&self) -> Vec<&str> {
        let list: Vec<&str> = self
            .coordinator
            .split(',')
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .collect();
        if list.is_empty() { vec![""] } else { list }
    }

    /// Checks values that deserialisation cannot.
    pub fn validate(&self) -> Result<(), EdgeError> {
        let bad = |m: String| Err(EdgeError::Config(m));
        if self.quic_stream_frames == 0 {
            return bad("quic_stream_frames must be >= 1".into());
        }
        if !(1..=MAX_QUIC_COPIES).contains(&self.quic_copies) {
            return bad(format!(
                "quic_copies must be 1 to {MAX_QUIC_COPIES}, not {}",
                self.quic_copies
            ));
        }
        if self.precompute && (matches!(self.source, SourceConfig::None) || self.listen.is_some()) {
            return bad(
                "precompute runs the backbone over the whole input before sending: it needs a \
                 dataset source and no local API (listen)"
                    .into(),
            );
        }
        if self.quic_copy_gap_ms > 1000 {
            return bad(format!(
                "quic_copy_gap_ms must be at most 1000, not {}",
                self.quic_copy_gap_ms
            ));
        }
        for c in self.coordinators() {
            if !(c.starts_with("http://") || c.starts_with("https://")) {
                return bad(format!(
                    "coordinator \"{c}\" is not an http:// or https:// URL"
                ));
            }
        }
        if self.edge_id.trim().is_empty() {
            return bad("edge_id is empty".into());
        }
        if self.max_in_flight == 0 {
            return bad("max_in_flight must be at least 1, got 0".into());
        }
        if self.batch_size == 0 || self.batch_size > 1024 {
            return bad(format!(
                "batch_size must be within 1..=1024, got {}",
                self.batch_size
            ));
        }
        if self.backbone_threads == 0 {
            return bad("backbone_threads must be at least 1, got 0".into());
        }
        if self.limit == Some(0) {
            return bad("limit must be at least 1 when set, got 0".into());
        }
        if self.output.as_deref().is_some_and(|o| o.trim().is_empty()) {
            return bad("output is empty; expected a file path or \"-\" for stdout".into());
        }
        let r = &self.reconnect;
        if r.initial_backoff_ms == 0 || r.max_backoff_ms < r.initial_backoff_ms {
            return bad(format!(
                "reconnect backoff must satisfy 0 < initial_backoff_ms <= max_backoff_ms, got {} and {}",
                r.initial_backoff_ms, r.max_backoff_ms
            ));
        }
        if self.answer_timeout_ms == 0 {
            return bad("answer_timeout_ms must be at least 1, got 0".into());
        }
        if r.max_attempts == 0 {
            return bad("reconnect.max_attempts must be at least 1, got 0".into());
        }
        if matches!(self.source, SourceConfig::None) && self.listen.is_none() {
            return bad("nothing to do: source is none and no listen address is set".into());
        }
        Ok(())
    }

    /// The in-flight drain timeout.
    pub fn drain_timeout(&self) -> Duration {
        Duration::from_millis(self.drain_timeout_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_need_a_source() {
        let err = EdgeConfig::default().validate().unwrap_err();
        assert!(err.to_string().contains("nothing to do"), "{err}");
        let cfg = EdgeConfig {
            source: SourceConfig::Folder {
                path: "imgs".into(),
            },
            ..EdgeConfig::default()
        };
        cfg.validate().unwrap();
    }

    #[test]
    fn codec_and_compression_are_chosen_by_name() {
        let cfg: EdgeConfig =
            serde_json::from_str(r#"{"codec":"int4_per_channel","compression":"zstd"}"#).unwrap();
        assert_eq!(cfg.codec, Codec::Int4PerChannel);
        assert_eq!(cfg.compression, Compression::Zstd);
        assert_eq!(EdgeConfig::default().compression, Compression::None);
        let err = serde_json::from_str::<EdgeConfig>(r#"{"compression":"gzip"}"#).unwrap_err();
        assert!(err.to_string().contains("unknown variant `gzip`"), "{err}");
    }

    #[test]
    fn deserialises_tagged_source_and_rejects_unknown_fields() {
        let cfg: EdgeConfig = serde_json::from_str(
            r#"{"codec":"f16","source":{"idx":{"images":"a.gz"}},"limit":5,
                "reconnect":{"max_attempts":3}}"#,
        )
        .unwrap();
        assert_eq!(cfg.codec, Codec::F16);
        assert_eq!(
            cfg.source,
            SourceConfig::Idx {
                images: "a.gz".into(),
                labels: None
            }
        );
        assert_eq!(cfg.reconnect.max_attempts, 3);
        assert_eq!(cfg.reconnect.initial_backoff_ms, 100);
        assert!(serde_json::from_str::<EdgeConfig>(r#"{"max_inflight":3}"#).is_err());
        let none: EdgeConfig = serde_json::from_str(r#"{"source":"none"}"#).unwrap();
        assert_eq!(none.source, SourceConfig::None);
    }

    #[test]
    fn backoff_doubles_and_caps() {
        let r = ReconnectConfig {
            initial_backoff_ms: 100,
            max_backoff_ms: 350,
            max_attempts: 5,
        };
        let ms: Vec<u128> = (1..=4).map(|a| r.backoff(a).as_millis()).collect();
        assert_eq!(ms, vec![100, 200, 350, 350]);
        assert_eq!(r.backoff(200).as_millis(), 350);
    }

    #[test]
    fn rejects_bad_values() {
        let base = EdgeConfig {
            listen: Some("127.0.0.1:0".parse().unwrap()),
            ..EdgeConfig::default()
        };
        base.validate().unwrap();
        for cfg in [
            EdgeConfig {
                coordinator: "127.0.0.1:7000".into(),
                ..base.clone()
            },
            EdgeConfig {
                max_in_flight: 0,
                ..base.clone()
            },
            EdgeConfig {
                quic_copies: 0,
                ..base.clone()
            },
            EdgeConfig {
                quic_copies: MAX_QUIC_COPIES + 1,
                ..base.clone()
            },
            EdgeConfig {
                quic_copy_gap_ms: 5000,
                ..base.clone()
            },
            // The local API never ends its input: nothing would ever be sent.
            EdgeConfig {
                precompute: true,
                ..base.clone()
            },
            EdgeConfig {
                reconnect: ReconnectConfig {
                    max_attempts: 0,
                    ..ReconnectConfig::default()
                },
                ..base.clone()
            },
        ] {
            assert!(cfg.validate().is_err(), "{cfg:?}");
        }
    }
}
