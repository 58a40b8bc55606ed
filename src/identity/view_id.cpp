#include "tensorreg/identity/view_id.hpp"

#include <limits>

#include "tensorreg/hash/multihash.hpp"
#include "tensorreg/hash/sha256.hpp"

namespace tensorreg::identity {
namespace {

template <typename UInt>
void put_le(std::string& out, UInt value) {
  for (std::size_t i = 0; i < sizeof(UInt); ++i) {
    out.push_back(static_cast<char>(static_cast<unsigned char>(value & 0xFFU)));
    value = static_cast<UInt>(value >> 8);
  }
}

void put_u32(std::string& out, std::size_t value) {
  TENSORREG_ASSERT(value <= std::numeric_limits<std::uint32_t>::max());
  put_le(out, static_cast<std::uint32_t>(value));
}

constexpr char narrow_tag = 0x00;
constexpr char transpose_tag = 0x01;

bool fits_u32(std::size_t n) noexcept { return n <= std::numeric_limits<std::uint32_t>::max(); }

}  // namespace

std::string view_payload(const view_spec& spec, std::string_view index_multihash) {
  std::string out;
  put_le(out, view_payload_version);
  put_u32(out, spec.size());
  for (const auto& [name, ops] : spec) {
    put_u32(out, name.size());
    out += name;
    put_u32(out, ops.size());
    for (const auto& op : ops) {
      if (const auto* n = std::get_if<narrow_op>(&op)) {
        out.push_back(narrow_tag);
        put_le(out, n->dim);  // i32le on the wire: the same 32 bits
        put_le(out, static_cast<std::uint64_t>(n->start));
        put_le(out, n->length);
      } else {
        const auto& t = std::get<transpose_op>(op);
        out.push_back(transpose_tag);
        put_le(out, t.dim0);
        put_le(out, t.dim1);
      }
    }
  }
  out += index_multihash;
  return out;
}

result<std::string> compute_view_id(const view_spec& spec, std::string_view index_multihash) {
  if (spec.empty()) return fail(errc::invalid_argument, "cannot compute view_id: empty view spec");
  if (!fits_u32(spec.size())) {
    return fail(errc::invalid_argument,
                "cannot compute view_id: " + std::to_string(spec.size()) + " tensors do not fit a u32 count");
  }
  for (const auto& [name, ops] : spec) {
    if (!fits_u32(name.size()) || !fits_u32(ops.size())) {
      return fail(errc::invalid_argument, "cannot compute view_id: tensor name of " + std::to_string(name.size()) +
                                              " bytes with " + std::to_string(ops.size()) +
                                              " ops does not fit u32 fields");
    }
  }
  auto index = hash::decode_multihash(index_multihash);
  if (!index) {
    return tl::unexpected(with_context(std::move(index).error(), "cannot compute view_id"));
  }
  return hash::encode_multihash(hash::sha256(view_payload(spec, index_multihash)));
}

status check_view_id(std::string_view provided, const view_spec& spec, std::string_view index_multihash) {
  TENSORREG_TRY_ASSIGN(const auto computed, compute_view_id(spec, index_multihash));
  if (provided != computed) {
    std::string shown(provided.substr(0, 96));
    if (provided.size() > 96) shown += "...";
    return fail(errc::invalid_argument,
                "view_id does not match view spec: provided '" + shown + "', computed '" + computed + "'");
  }
  return {};
}

}  // namespace tensorreg::identity
