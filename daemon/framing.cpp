// daemon/framing.cpp — see framing.hpp.
#include "framing.hpp"

#include <algorithm>
#include <cstring>

namespace tensorreg::daemon {

namespace {

// First growth step of a payload buffer. Small frames (the common case) get one allocation;
// large ones double from here, capped at their declared length.
constexpr std::size_t initial_payload_capacity = 64 * 1024;

}  // namespace

std::array<std::byte, frame_header_bytes> encode_frame_header(std::uint32_t payload_length) noexcept {
  return {static_cast<std::byte>(payload_length & 0xffu), static_cast<std::byte>((payload_length >> 8) & 0xffu),
          static_cast<std::byte>((payload_length >> 16) & 0xffu),
          static_cast<std::byte>((payload_length >> 24) & 0xffu)};
}

std::uint32_t decode_frame_header(std::span<const std::byte, frame_header_bytes> header) noexcept {
  return static_cast<std::uint32_t>(header[0]) | (static_cast<std::uint32_t>(header[1]) << 8) |
         (static_cast<std::uint32_t>(header[2]) << 16) | (static_cast<std::uint32_t>(header[3]) << 24);
}

result<std::string> encode_frame(std::string_view payload, std::uint32_t max_frame_bytes) {
  if (payload.empty()) {
    return fail(errc::invalid_argument, "cannot write frame: payload is empty");
  }
  if (payload.size() > max_frame_bytes) {
    return fail(errc::resource_exhausted, "cannot write frame: length " + std::to_string(payload.size()) +
                                              " exceeds max_frame_bytes " + std::to_string(max_frame_bytes));
  }
  const auto header = encode_frame_header(static_cast<std::uint32_t>(payload.size()));
  std::string frame;
  frame.reserve(frame_header_bytes + payload.size());
  frame.append(reinterpret_cast<const char*>(header.data()), header.size());
  frame.append(payload);
  return frame;
}

frame_decoder::frame_decoder(std::uint32_t max_frame_bytes) noexcept : max_frame_bytes_(max_frame_bytes) {
  TENSORREG_ASSERT(max_frame_bytes > 0);
}

status frame_decoder::feed(std::string_view bytes) {
  return feed(std::as_bytes(std::span<const char>(bytes.data(), bytes.size())));
}

status frame_decoder::feed(std::span<const std::byte> bytes, std::vector<unique_fd> fds) {
  // The frames this call completes are appended to ready_ from `first` on, in stream order.
  const std::size_t first = ready_.size();
  const std::uint64_t start = bytes_fed_;
  TENSORREG_TRY(feed(bytes));
  if (fds.empty()) return {};
  decoded_frame* to = nullptr;
  if (partial_bytes() > 0 && partial_.stream_offset >= start) {
    to = &partial_;  // the last frame to begin here is still in progress
  } else {
    for (std::size_t i = first; i < ready_.size(); ++i) {
      if (ready_[i].stream_offset >= start) to = &ready_[i];
    }
  }
  if (to == nullptr) to = first < ready_.size() ? &ready_[first] : &partial_;  // no frame begins here
  if (to->fds.size() + fds.size() > max_fds_per_frame) {
    failure_ = error{errc::invalid_argument, "cannot read frame: more than " + std::to_string(max_fds_per_frame) +
                                                 " file descriptors arrived for the frame at stream offset " +
                                                 std::to_string(to->stream_offset)};
    // The frames this read completed go with it: none of them may be dispatched without the
    // fds it claims. The fds close with `fds`.
    ready_.erase(ready_.begin() + static_cast<std::ptrdiff_t>(first), ready_.end());
    return tl::unexpected(*failure_);
  }
  for (auto& fd : fds) to->fds.push_back(std::move(fd));
  return {};
}

status frame_decoder::feed(std::span<const std::byte> bytes) {
  if (failure_) {
    bytes_fed_ += bytes.size();
    return tl::unexpected(*failure_);
  }
  const std::byte* cursor = bytes.data();
  std::size_t left = bytes.size();
  while (left > 0) {
    if (!in_payload_) {
      if (header_filled_ == 0) partial_.stream_offset = bytes_fed_;
      const std::size_t take = std::min(left, frame_header_bytes - header_filled_);
      std::memcpy(header_.data() + header_filled_, cursor, take);
      header_filled_ += take;
      cursor += take;
      left -= take;
      bytes_fed_ += take;
      if (header_filled_ < frame_header_bytes) break;

      const std::uint32_t length = decode_frame_header(header_);
      if (length == 0) {
        failure_ = error{errc::invalid_argument, "cannot read frame: zero-length frame at stream offset " +
                                                     std::to_string(partial_.stream_offset)};
      } else if (length > max_frame_bytes_) {
        failure_ = error{errc::resource_exhausted, "cannot read frame: length " + std::to_string(length) +
                                                       " exceeds max_frame_bytes " + std::to_string(max_frame_bytes_)};
      }
      if (failure_) {
        header_filled_ = 0;  // nothing is held for a rejected frame
        bytes_fed_ += left;  // the rest of the stream is no longer framed: ignore it
        return tl::unexpected(*failure_);
      }
      header_filled_ = 0;
      in_payload_ = true;
      payload_length_ = length;
      partial_.payload.clear();
      continue;
    }

    const std::size_t missing = payload_length_ - partial_.payload.size();
    const std::size_t take = std::min(left, missing);
    append_payload(cursor, take);
    cursor += take;
    left -= take;
    bytes_fed_ += take;
    if (partial_.payload.size() == payload_length_) {
      ready_.push_back(std::move(partial_));
      partial_ = decoded_frame{};
      in_payload_ = false;
    }
  }
  return {};
}

void frame_decoder::append_payload(const std::byte* data, std::size_t count) {
  std::string& payload = partial_.payload;
  const std::size_t needed = payload.size() + count;
  if (needed > payload.capacity()) {
    // Grow by doubling, from a small first step, never past the declared length: memory
    // follows the bytes that actually arrived, not what the header promised.
    const std::size_t doubled = std::max(initial_payload_capacity, 2 * payload.capacity());
    const std::size_t target = std::min<std::size_t>(payload_length_, std::max(needed, doubled));
    // A fresh string reserves exactly; reserve() on the old one would round up to twice its
    // capacity (libstdc++), overshooting the declared length.
    std::string grown;
    grown.reserve(target);
    grown.append(payload);
    payload.swap(grown);
  }
  payload.append(reinterpret_cast<const char*>(data), count);
}

std::optional<decoded_frame> frame_decoder::next() {
  if (ready_.empty()) return std::nullopt;
  decoded_frame frame = std::move(ready_.front());
  ready_.pop_front();
  return frame;
}

status frame_decoder::finish() const {
  if (failure_) return tl::unexpected(*failure_);
  if (header_filled_ > 0) {
    return fail(errc::data_loss, "cannot read frame: stream ended inside the frame header (" +
                                     std::to_string(header_filled_) + " of " + std::to_string(frame_header_bytes) +
                                     " bytes)");
  }
  if (in_payload_) {
    return fail(errc::data_loss, "cannot read frame: stream ended inside a frame at stream offset " +
                                     std::to_string(partial_.stream_offset) + " (" +
                                     std::to_string(partial_.payload.size()) + " of " +
                                     std::to_string(payload_length_) + " payload bytes)");
  }
  return {};
}

}  // namespace tensorreg::daemon
