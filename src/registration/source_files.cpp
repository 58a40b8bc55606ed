#include "registration/source_files.hpp"

#include <fcntl.h>
#include <sys/stat.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <string>

#include "memory/buffered_reads.hpp"

namespace tensorreg::registration::detail {
namespace {

constexpr const char* kBegin = "cannot begin stable_dram registration from files";

std::string segment_name(std::size_t i, const file_segment& s) {
  return "file segment " + std::to_string(i) + " (fd #" + std::to_string(s.file) + ", canonical bytes [" +
         std::to_string(s.canonical_offset) + ", +" + std::to_string(s.length) + "))";
}

// [begin, end) intervals of consecutive DATA bytes of `map`.
std::vector<std::pair<std::uint64_t, std::uint64_t>> data_runs(const index::byte_range_map& map) {
  std::vector<std::pair<std::uint64_t, std::uint64_t>> runs;
  for (const auto& r : map.ranges()) {
    if (r.kind != index::range_kind::data) continue;
    if (!runs.empty() && runs.back().second == r.offset) {
      runs.back().second = r.offset + r.length;
    } else {
      runs.emplace_back(r.offset, r.offset + r.length);
    }
  }
  return runs;
}

}  // namespace

result<source_files> source_files::check(std::vector<std::shared_ptr<const unique_fd>> files,
                                         std::vector<file_segment> segments, const index::byte_range_map& map) {
  const std::string what = kBegin;
  std::vector<std::uint64_t> sizes;
  sizes.reserve(files.size());
  for (std::size_t k = 0; k < files.size(); ++k) {
    const int fd = files[k] ? files[k]->get() : -1;
    struct stat st {};
    if (fd < 0 || ::fstat(fd, &st) != 0) {
      return fail(errc::invalid_argument, what + ": fd #" + std::to_string(k) +
                                              " cannot be examined: " + std::strerror(fd < 0 ? EBADF : errno));
    }
    if (!S_ISREG(st.st_mode)) {
      const char* kind = S_ISDIR(st.st_mode)    ? "a directory"
                         : S_ISFIFO(st.st_mode) ? "a pipe"
                         : S_ISSOCK(st.st_mode) ? "a socket"
                         : S_ISCHR(st.st_mode)  ? "a character device"
                         : S_ISBLK(st.st_mode)  ? "a block device"
                                                : "not a regular file";
      return fail(errc::invalid_argument, what + ": fd #" + std::to_string(k) + " is " + kind + ", not a regular file");
    }
    const int flags = ::fcntl(fd, F_GETFL);
    if (flags < 0 || (flags & O_PATH) != 0 || (flags & O_ACCMODE) == O_WRONLY) {
      return fail(errc::invalid_argument, what + ": fd #" + std::to_string(k) + " is not open for reading");
    }
    sizes.push_back(static_cast<std::uint64_t>(st.st_size));
  }
  const std::uint64_t total = map.total_size();
  std::uint64_t data = 0;
  std::vector<std::pair<std::uint64_t, std::uint64_t>> covered;  // merged, like data_runs()
  for (std::size_t i = 0; i < segments.size(); ++i) {
    const auto& s = segments[i];
    if (s.length == 0) return fail(errc::invalid_argument, what + ": " + segment_name(i, s) + " is empty");
    if (s.file >= files.size()) {
      return fail(errc::invalid_argument, what + ": " + segment_name(i, s) + " names an fd the frame did not carry (" +
                                              std::to_string(files.size()) + " arrived)");
    }
    if (s.canonical_offset > total || s.length > total - s.canonical_offset) {
      return fail(errc::invalid_argument,
                  what + ": " + segment_name(i, s) + " ends past total_size " + std::to_string(total));
    }
    const auto size = sizes[s.file];
    if (s.file_offset > size || s.length > size - s.file_offset) {
      return fail(errc::invalid_argument, what + ": " + segment_name(i, s) + " reads file bytes [" +
                                              std::to_string(s.file_offset) + ", +" + std::to_string(s.length) +
                                              "), past the file's " + std::to_string(size) + " bytes");
    }
    if (!covered.empty() && s.canonical_offset < covered.back().second) {
      return fail(errc::invalid_argument,
                  what + ": " + segment_name(i, s) + " overlaps the one before it or is out of canonical order");
    }
    if (!covered.empty() && covered.back().second == s.canonical_offset) {
      covered.back().second += s.length;
    } else {
      covered.emplace_back(s.canonical_offset, s.canonical_offset + s.length);
    }
    data += s.length;
  }
  // The segments must place exactly the DATA bytes: a byte of PAD read from a file could be
  // anything, and a DATA byte left out would read as zero.
  const auto runs = data_runs(map);
  if (covered != runs) {
    std::size_t k = 0;
    while (k < covered.size() && k < runs.size() && covered[k] == runs[k]) ++k;
    if (k < runs.size() && (k >= covered.size() || covered[k].first > runs[k].first ||
                            (covered[k].first == runs[k].first && covered[k].second < runs[k].second))) {
      const auto from = k < covered.size() && covered[k].first == runs[k].first ? covered[k].second : runs[k].first;
      return fail(errc::invalid_argument, what + ": no segment covers canonical bytes [" + std::to_string(from) + ", " +
                                              std::to_string(runs[k].second) + "), which hold tensor data");
    }
    return fail(errc::invalid_argument,
                what + ": the segments cover canonical bytes [" + std::to_string(covered[k].first) + ", " +
                    std::to_string(covered[k].second) + "), which are not all tensor data (padding must stay zero)");
  }
  return source_files(std::move(files), std::move(sizes), std::move(segments), data);
}

status source_files::read(std::uint64_t offset, std::span<std::byte> out, bool zero_gaps) const {
  const std::uint64_t end = offset + out.size();
  std::uint64_t cursor = offset;
  // First segment that ends after `offset`.
  auto it = std::upper_bound(segments_.begin(), segments_.end(), offset, [](std::uint64_t at, const file_segment& s) {
    return at < s.canonical_offset + s.length;
  });
  const auto gap = [&](std::uint64_t to) {
    if (zero_gaps && to > cursor) std::memset(out.data() + (cursor - offset), 0, to - cursor);
  };
  for (; it != segments_.end() && it->canonical_offset < end; ++it) {
    const std::uint64_t from = std::max(cursor, it->canonical_offset);
    gap(from);
    const std::uint64_t to = std::min(end, it->canonical_offset + it->length);
    const std::uint64_t file_at = it->file_offset + (from - it->canonical_offset);
    if (const auto short_of = memory::pread_fully(
            files_[it->file]->get(), out.subspan(from - offset, static_cast<std::size_t>(to - from)), file_at)) {
      const std::string reason = short_of->error == 0 ? "the file ends there now (it was truncated after the put began)"
                                                      : std::strerror(short_of->error);
      return fail(errc::failed_precondition, "cannot read the put's fd #" + std::to_string(it->file) +
                                                 " at file offset " + std::to_string(file_at + short_of->got) + ": " +
                                                 reason);
    }
    cursor = to;
  }
  gap(end);
  return {};
}

status source_files::check_unchanged() const {
  for (std::size_t k = 0; k < files_.size(); ++k) {
    struct stat st {};
    if (::fstat(files_[k]->get(), &st) != 0) {
      const int e = errno;
      return fail(errc::failed_precondition,
                  "cannot check the put's fd #" + std::to_string(k) + ": " + std::string(std::strerror(e)));
    }
    if (static_cast<std::uint64_t>(st.st_size) != sizes_[k]) {
      return fail(errc::failed_precondition, "cannot keep the bytes of the put's fd #" + std::to_string(k) +
                                                 ": the file changed size during the put, from " +
                                                 std::to_string(sizes_[k]) + " to " + std::to_string(st.st_size) +
                                                 " bytes");
    }
  }
  return {};
}

}  // namespace tensorreg::registration::detail
