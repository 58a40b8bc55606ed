// daemon/framing.hpp — length-prefixed frames on a byte stream (docs/wire-format.md).
//
// Provides the frame header codec (`encode_frame_header`, `decode_frame_header`,
// `encode_frame`) and `frame_decoder`, an incremental decoder that is fed whatever chunks a
// socket read returned and hands back whole payloads. A frame is a 4-byte little-endian
// unsigned payload length followed by that many payload bytes; the payload is one
// serialised protobuf envelope, which this layer never looks into (no protobuf, no asio:
// testable without sockets).
//
// Lengths are never trusted: a declared length above `max_frame_bytes` is rejected as soon
// as its 4 header bytes are in, before anything is allocated for it, and a payload buffer
// grows only as its bytes arrive, so a peer that declares 64 MiB and sends 10 bytes costs
// about 10 bytes.
//
// Thread-safety: `frame_decoder` is a plain value with no internal locking; use one per
// connection from one thread (or strand) at a time. The free functions are pure.
// Ownership: the decoder copies what it is fed and owns the fds fed to it until their frame is
// taken; returned payloads and fds are owned by the caller.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "tensorreg/common/error.hpp"
#include "tensorreg/common/unique_fd.hpp"

namespace tensorreg::daemon {

/// Bytes in a frame header (the little-endian payload length).
inline constexpr std::size_t frame_header_bytes = 4;

/// Default cap on a frame's payload length (64 MiB); configurable per connection.
inline constexpr std::uint32_t default_max_frame_bytes = 64u * 1024u * 1024u;

/// At most this many fds travel with one frame (docs/wire-format.md §7, DECISIONS §4.1), however
/// many reads they arrive in.
inline constexpr std::size_t max_fds_per_frame = 250;

/// The 4 header bytes for a payload of `payload_length` bytes (little-endian).
[[nodiscard]] std::array<std::byte, frame_header_bytes> encode_frame_header(std::uint32_t payload_length) noexcept;

/// The payload length a 4-byte header declares.
[[nodiscard]] std::uint32_t decode_frame_header(std::span<const std::byte, frame_header_bytes> header) noexcept;

/// Header + payload, ready to write.
/// Errors: INVALID_ARGUMENT for an empty payload (a zero-length frame is never valid);
/// RESOURCE_EXHAUSTED when the payload is longer than `max_frame_bytes`.
[[nodiscard]] result<std::string> encode_frame(std::string_view payload,
                                               std::uint32_t max_frame_bytes = default_max_frame_bytes);

/// One decoded frame.
struct decoded_frame {
  /// Offset, from the start of the stream, of the frame's first header byte. A session uses
  /// it to match SCM_RIGHTS fds to the frame whose first byte arrived with them.
  std::uint64_t stream_offset = 0;
  /// The payload (without the header); never empty.
  std::string payload;
  /// The fds that arrived with this frame's bytes (feed() with fds), in arrival order.
  std::vector<unique_fd> fds;
};

/// Incremental decoder of a stream of frames.
///
/// `feed()` consumes every byte it is given; completed frames queue up and are taken with
/// `next()`, oldest first. The first bad header (zero length, or a length above
/// `max_frame_bytes`) makes the decoder failed: `feed()` returns that error then and on every
/// later call, and ignores later bytes. Frames completed before the bad header stay
/// available through `next()`. A stream is expected to end on a frame boundary; call
/// `finish()` at end of stream to learn whether it did.
class frame_decoder {
 public:
  /// REQUIRES: max_frame_bytes > 0.
  explicit frame_decoder(std::uint32_t max_frame_bytes = default_max_frame_bytes) noexcept;

  /// Consumes `bytes` (any length, including 0).
  /// Errors: INVALID_ARGUMENT "cannot read frame: zero-length frame at stream offset N";
  /// RESOURCE_EXHAUSTED "cannot read frame: length N exceeds max_frame_bytes M".
  /// Once failed, returns the same error for every later call.
  [[nodiscard]] status feed(std::span<const std::byte> bytes);
  /// Consumes `bytes`, one read's worth, and `fds`, the SCM_RIGHTS that arrived with it. The
  /// fds go to the last frame that begins within `bytes` (docs/wire-format.md §7: a sender
  /// attaches a frame's fds to the sendmsg that starts it and puts no later frame in it; the
  /// kernel may join earlier fd-less bytes to that read, never later ones), or, when no frame
  /// begins there, to the frame the first byte continues. Fds fed after a failure are closed.
  /// Errors: as feed(bytes); INVALID_ARGUMENT "cannot read frame: more than 250 file
  /// descriptors arrived for the frame at stream offset N" when a frame's fds, summed over
  /// every read that brought some, pass max_fds_per_frame (a peer must not park fds in us one
  /// byte at a time), after which the decoder is failed as for a bad header; the frames that
  /// read completed are dropped with it.
  [[nodiscard]] status feed(std::span<const std::byte> bytes, std::vector<unique_fd> fds);
  /// Same as the span overload, for bytes held as chars.
  [[nodiscard]] status feed(std::string_view bytes);

  /// The oldest completed frame not yet taken, or nullopt.
  [[nodiscard]] std::optional<decoded_frame> next();

  /// Completed frames waiting in `next()`.
  [[nodiscard]] std::size_t ready_frames() const noexcept { return ready_.size(); }

  /// Call at end of stream (the peer closed its side).
  /// Errors: the decoder's own error if it failed; DATA_LOSS "cannot read frame: stream
  /// ended inside the frame header (2 of 4 bytes)" or "... inside a frame at stream offset
  /// N (10 of 4096 payload bytes)" when the stream stopped mid-frame.
  [[nodiscard]] status finish() const;

  /// True when no partial frame (header or payload) is buffered.
  [[nodiscard]] bool at_frame_boundary() const noexcept { return header_filled_ == 0 && !in_payload_; }

  /// True after a bad header; `failure()` tells which.
  [[nodiscard]] bool failed() const noexcept { return failure_.has_value(); }
  /// REQUIRES: failed().
  [[nodiscard]] const error& failure() const noexcept { return *failure_; }

  /// Every byte fed so far (including ones ignored after a failure).
  [[nodiscard]] std::uint64_t bytes_fed() const noexcept { return bytes_fed_; }
  /// Bytes held for the partial frame in progress (header bytes + payload bytes so far).
  [[nodiscard]] std::size_t partial_bytes() const noexcept {
    return (in_payload_ ? frame_header_bytes : header_filled_) + partial_.payload.size();
  }
  /// Stream offset of the partial frame's first header byte. REQUIRES: partial_bytes() > 0.
  [[nodiscard]] std::uint64_t partial_stream_offset() const noexcept { return partial_.stream_offset; }
  /// Bytes allocated for the partial frame's payload: at most the declared length, and
  /// about twice what has arrived (never less than a small first step).
  [[nodiscard]] std::size_t partial_capacity() const noexcept { return partial_.payload.capacity(); }
  /// The payload cap this decoder enforces.
  [[nodiscard]] std::uint32_t max_frame_bytes() const noexcept { return max_frame_bytes_; }

 private:
  void append_payload(const std::byte* data, std::size_t count);

  std::uint32_t max_frame_bytes_;
  std::uint64_t bytes_fed_ = 0;  // stream offset of the next byte fed
  std::array<std::byte, frame_header_bytes> header_{};
  std::size_t header_filled_ = 0;     // header bytes of the frame in progress
  bool in_payload_ = false;           // header complete, payload in progress
  std::uint32_t payload_length_ = 0;  // declared length of the frame in progress
  decoded_frame partial_;
  std::deque<decoded_frame> ready_;
  std::optional<error> failure_;
};

}  // namespace tensorreg::daemon
