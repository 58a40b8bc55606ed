// fuzz/framing_fuzz.cpp — the frame decoder, fed a stream in arbitrary chunks with fds.
//
// Input: byte 0 picks max_frame_bytes (0: the default cap, else 16 × the byte); byte 1 is the
// length P of a chunk plan; the next P bytes are the plan, one byte per socket read (low 6
// bits: bytes in the read, 0 meaning 64; high 2 bits: fds that arrived with it), cycled until
// the stream is used up (no plan: one read); the rest is the byte stream itself. The fds are
// dup()s of /dev/null.
//
// Checked against a one-shot reference decode of the whole stream: the same frames (offsets
// and payloads) in the same order, the same first error (code and message), the same
// finish() answer, bytes_fed and buffering within the declared length; and after the decoder
// and every frame are gone, each fd that was fed is closed again. A frame whose fds, over all
// its reads, pass max_fds_per_frame fails the stream at the read that brought the excess.
//
// The fds follow docs/wire-format.md §7: a read's fds belong to the last frame that begins in
// it, or, when none begins there, to the frame its first byte continues. Where the decoder
// takes fds itself (feed(bytes, fds)), this checks that it hands each frame those fds; with
// the byte-only decoder the harness attaches them by stream offset, as a session would.
#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "daemon/framing.hpp"
#include "fuzz/fuzz_check.hpp"
#include "tensorreg/common/unique_fd.hpp"

namespace {

using tensorreg::errc;
using tensorreg::unique_fd;
using tensorreg::daemon::frame_decoder;

struct ref_frame {
  std::uint64_t offset = 0;
  std::string payload;
};

// One-shot decode of the whole stream, written as plainly as possible.
struct reference {
  std::vector<ref_frame> frames;
  std::optional<tensorreg::error> failure;
  std::uint64_t failure_header_end = 0;  // stream offset just past the bad header
  std::uint64_t partial_offset = 0;      // the unfinished frame at the end, if any
  std::uint64_t partial_header = 0;      // header bytes of it (0..3), when < 4
  std::optional<std::uint32_t> partial_length;
  std::uint64_t partial_payload = 0;

  reference(std::string_view s, std::uint32_t max) {
    std::uint64_t at = 0;
    while (at < s.size()) {
      if (s.size() - at < 4) {
        partial_offset = at;
        partial_header = s.size() - at;
        return;
      }
      const auto b = [&](std::size_t i) { return static_cast<std::uint32_t>(static_cast<unsigned char>(s[at + i])); };
      const std::uint32_t length = b(0) | (b(1) << 8) | (b(2) << 16) | (b(3) << 24);
      if (length == 0) {
        failure = tensorreg::error{errc::invalid_argument,
                                   "cannot read frame: zero-length frame at stream offset " + std::to_string(at)};
      } else if (length > max) {
        failure = tensorreg::error{errc::resource_exhausted, "cannot read frame: length " + std::to_string(length) +
                                                                 " exceeds max_frame_bytes " + std::to_string(max)};
      }
      if (failure) {
        failure_header_end = at + 4;
        return;
      }
      if (s.size() - at - 4 < length) {
        partial_offset = at;
        partial_length = length;
        partial_payload = s.size() - at - 4;
        return;
      }
      frames.push_back({at, std::string(s.substr(at + 4, length))});
      at += 4 + std::uint64_t{length};
    }
  }

  // Index of the frame that owns the fds of the read [begin, end), or nullopt when that frame
  // is never completed.
  [[nodiscard]] std::optional<std::size_t> owner(std::uint64_t begin, std::uint64_t end) const {
    // The unfinished frame at the end of the stream is the last to begin anywhere.
    const bool partial = partial_header > 0 || partial_length.has_value();
    if (partial && partial_offset >= begin && partial_offset < end) return std::nullopt;
    std::optional<std::size_t> found;
    for (std::size_t i = 0; i < frames.size(); ++i) {
      if (frames[i].offset >= begin && frames[i].offset < end) found = i;
    }
    if (found) return found;
    for (std::size_t i = 0; i < frames.size(); ++i) {
      if (frames[i].offset <= begin && begin < frames[i].offset + 4 + frames[i].payload.size()) return i;
    }
    return std::nullopt;
  }
};

template <class Decoder>
concept feeds_fds = requires(Decoder& d, std::span<const std::byte> b, std::vector<unique_fd> f) {
  d.feed(b, std::move(f));
};
template <class Frame>
concept carries_fds = requires(Frame& f) {
  f.fds.size();
};

// Frames are checked and their fds closed as they are taken, so that an input of many reads
// never holds more fds than one frame may.
struct taken_frame {
  std::uint64_t offset = 0;
  std::string payload;
  std::size_t fds = 0;
};

struct harness {
  const reference& ref;
  std::vector<taken_frame> taken;
  std::vector<std::vector<unique_fd>> attached;  // harness-side attachment, by reference frame
  std::vector<std::size_t> expected_fds;         // by reference frame
  std::vector<unique_fd> unowned;                // fds of reads whose frame never completes

  explicit harness(const reference& r) : ref(r), attached(r.frames.size()), expected_fds(r.frames.size(), 0) {}

  template <class Decoder>
  tensorreg::status feed(Decoder& d, std::span<const std::byte> bytes, std::uint64_t begin, std::vector<unique_fd> fds,
                         bool fails) {
    const auto owner = ref.owner(begin, begin + bytes.size());
    if (owner && !ref.failure && !fails) expected_fds[*owner] += fds.size();
    if constexpr (feeds_fds<Decoder>) {
      return d.feed(bytes, std::move(fds));
    } else {
      for (auto& fd : fds) (owner ? attached[*owner] : unowned).push_back(std::move(fd));
      return d.feed(bytes);
    }
  }

  template <class Decoder>
  void take(Decoder& d) {
    while (auto f = d.next()) {
      taken_frame t{f->stream_offset, std::move(f->payload), 0};
      if constexpr (carries_fds<std::remove_cvref_t<decltype(*f)>>) t.fds = f->fds.size();
      taken.push_back(std::move(t));
    }
  }
};

void check_same_error(const tensorreg::error& got, const tensorreg::error& want) {
  FUZZ_CHECK(got.code == want.code, got.message.c_str());
  FUZZ_CHECK(got.message == want.message, got.message.c_str());
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size < 2) return 0;
  const std::uint32_t max = data[0] == 0 ? tensorreg::daemon::default_max_frame_bytes : 16u * data[0];
  const std::size_t plan_len = std::min<std::size_t>(data[1], size - 2);
  const std::span<const std::uint8_t> plan(data + 2, plan_len);
  const std::string_view stream(reinterpret_cast<const char*>(data + 2 + plan_len), size - 2 - plan_len);
  const reference ref(stream, max);

  // One socket read of the plan: its length and the fds that arrive with it.
  const auto read_at = [&](std::uint64_t at, std::size_t step) {
    std::size_t len = stream.size() - at;
    std::size_t nfds = 0;
    if (!plan.empty()) {
      const auto p = plan[step % plan.size()];
      len = std::min<std::size_t>(len, (p & 0x3f) == 0 ? 64 : (p & 0x3f));
      nfds = p >> 6;
    }
    return std::pair{len, nfds};
  };

  // The read at which one frame's fds, summed over its reads, first pass max_fds_per_frame —
  // unless a bad header fails the stream first. It fails the stream from that read on.
  struct fd_overflow {
    std::uint64_t read_begin = 0;
    std::uint64_t frame_offset = 0;
  };
  std::optional<fd_overflow> overflow;
  {
    std::vector<std::size_t> per_frame(ref.frames.size() + 1, 0);  // the last: the unfinished frame
    std::uint64_t at = 0;
    for (std::size_t step = 0; at < stream.size() && !overflow; ++step) {
      const auto [len, nfds] = read_at(at, step);
      if (ref.failure && at + len >= ref.failure_header_end) break;
      const auto owner = ref.owner(at, at + len).value_or(ref.frames.size());
      per_frame[owner] += nfds;
      if (per_frame[owner] > tensorreg::daemon::max_fds_per_frame) {
        overflow = fd_overflow{at, owner < ref.frames.size() ? ref.frames[owner].offset : ref.partial_offset};
      }
      at += len;
    }
  }
  const std::optional<tensorreg::error> failure =
      overflow ? std::optional(tensorreg::error{tensorreg::errc::invalid_argument,
                                                "cannot read frame: more than " +
                                                    std::to_string(tensorreg::daemon::max_fds_per_frame) +
                                                    " file descriptors arrived for the frame at stream offset " +
                                                    std::to_string(overflow->frame_offset)})
               : ref.failure;
  // The frames a failed stream still hands out: those complete before the read that broke the
  // fd cap (its own frames go with it), or before the bad header.
  std::size_t expected_frames = ref.frames.size();
  if (overflow) {
    expected_frames = 0;
    while (expected_frames < ref.frames.size() &&
           ref.frames[expected_frames].offset + 4 + ref.frames[expected_frames].payload.size() <=
               overflow->read_begin) {
      ++expected_frames;
    }
  }

  static const int dev_null = ::open("/dev/null", O_RDONLY | O_CLOEXEC);
  FUZZ_CHECK(dev_null >= 0, "cannot open /dev/null");
  std::vector<int> fed_fds;

  {
    harness h(ref);
    frame_decoder decoder(max);
    std::uint64_t at = 0;
    std::size_t step = 0;
    bool saw_error = false;
    while (at < stream.size()) {
      const auto [len, nfds] = read_at(at, step++);
      // The error shows on the read that completes the bad header or breaks the fd cap, and on
      // every later one.
      const bool should_fail =
          overflow ? at >= overflow->read_begin : (ref.failure && at + len >= ref.failure_header_end);
      std::vector<unique_fd> fds;
      for (std::size_t i = 0; i < nfds; ++i) {
        unique_fd fd(::fcntl(dev_null, F_DUPFD_CLOEXEC, 0));
        FUZZ_CHECK(fd, "cannot dup /dev/null");
        fed_fds.push_back(fd.get());
        fds.push_back(std::move(fd));
      }
      const auto bytes = std::as_bytes(std::span<const char>(stream.data() + at, len));
      auto fed = h.feed(decoder, bytes, at, std::move(fds), should_fail);
      at += len;
      FUZZ_CHECK(fed.has_value() != should_fail, "feed() failed at the wrong read");
      if (!fed) {
        check_same_error(fed.error(), *failure);
        saw_error = true;
      }
      FUZZ_CHECK(decoder.bytes_fed() == at, "bytes_fed is not the bytes fed");
      if (!decoder.failed() && !decoder.at_frame_boundary()) {
        // Memory follows the bytes that arrived, never past the declared length.
        FUZZ_CHECK(decoder.partial_bytes() <= at, "more bytes buffered than fed");
        FUZZ_CHECK(decoder.partial_capacity() <= std::max<std::size_t>(max, 15),
                   "payload buffer larger than max_frame_bytes");
      }
      h.take(decoder);
    }
    h.take(decoder);
    FUZZ_CHECK(saw_error == failure.has_value(), "the failure was never reported");
    FUZZ_CHECK(decoder.failed() == failure.has_value(), "failed() disagrees with the reference");
    if (decoder.failed()) check_same_error(decoder.failure(), *failure);

    FUZZ_CHECK(h.taken.size() == expected_frames, "a different number of frames");
    for (std::size_t i = 0; i < expected_frames; ++i) {
      FUZZ_CHECK(h.taken[i].offset == ref.frames[i].offset, "a frame at a different stream offset");
      FUZZ_CHECK(h.taken[i].payload == ref.frames[i].payload, "a frame with a different payload");
      if constexpr (feeds_fds<frame_decoder>) {
        if (!ref.failure) FUZZ_CHECK(h.taken[i].fds == h.expected_fds[i], "a frame got another read's fds");
      }
    }

    auto finished = decoder.finish();
    if (failure) {
      FUZZ_CHECK(!finished, "finish() after a failure is OK");
      check_same_error(finished.error(), *failure);
    } else if (ref.partial_header > 0) {
      FUZZ_CHECK(!finished && finished.error().code == errc::data_loss, "a partial header is not DATA_LOSS");
      FUZZ_CHECK(finished.error().message == "cannot read frame: stream ended inside the frame header (" +
                                                 std::to_string(ref.partial_header) + " of 4 bytes)",
                 finished.error().message.c_str());
    } else if (ref.partial_length) {
      FUZZ_CHECK(!finished && finished.error().code == errc::data_loss, "a partial payload is not DATA_LOSS");
      FUZZ_CHECK(finished.error().message == "cannot read frame: stream ended inside a frame at stream offset " +
                                                 std::to_string(ref.partial_offset) + " (" +
                                                 std::to_string(ref.partial_payload) + " of " +
                                                 std::to_string(*ref.partial_length) + " payload bytes)",
                 finished.error().message.c_str());
    } else {
      FUZZ_CHECK(finished.has_value(), "finish() on a frame boundary failed");
      FUZZ_CHECK(decoder.at_frame_boundary(), "at_frame_boundary() is false at a boundary");
    }
  }
  // Every fd fed is closed once the decoder and the frames are gone.
  for (int fd : fed_fds) {
    FUZZ_CHECK(::fcntl(fd, F_GETFD) == -1 && errno == EBADF, "an fd fed to the decoder is still open");
  }
  return 0;
}
