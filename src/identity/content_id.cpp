#include "tensorreg/identity/content_id.hpp"

#include "tensorreg/hash/tree_hash.hpp"

namespace tensorreg::identity {

result<mi2_id> content_id(std::string_view index_json, const memory::byte_source& data, thread_pool* pool) {
  mi2_id id;
  id.index = hash::sha256(index_json);
  TENSORREG_TRY_ASSIGN(id.data, hash::tree_hash(data, pool));
  return id;
}

}  // namespace tensorreg::identity
