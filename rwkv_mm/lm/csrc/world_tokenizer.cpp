// Greedy longest-prefix-match encoder for the RWKV World vocabulary (rwkv_mm.lm.tokenizer).
//
// The vocabulary is a set of byte strings; encoding walks a byte trie from each position and emits the
// longest token that is a prefix of the rest of the input, exactly as the rwkv pip package's TRIE_TOKENIZER.
// The trie is built once from the sorted tokens: every node's children are stored as a sorted edge list,
// and nodes with many children (the root, common first bytes) also get a dense 256-entry table.
// Only pybind11 is included (no torch headers), so the one-time build takes seconds.

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace py = pybind11;

namespace {

constexpr int kDenseMin = 8;  // nodes with at least this many children get a dense child table

class WorldTrie {
 public:
  explicit WorldTrie(std::vector<std::pair<std::string, int64_t>> tokens) {
    std::stable_sort(tokens.begin(), tokens.end(),
                     [](const auto& a, const auto& b) { return a.first < b.first; });
    new_node();
    build(tokens, 0, tokens.size(), 0, 0);
    int64_t max_id = 0;
    for (const auto& t : tokens) max_id = std::max(max_id, t.second);
    ints_.reserve(static_cast<size_t>(max_id) + 1);
    for (int64_t i = 0; i <= max_id; ++i) ints_.push_back(py::int_(i));
  }

  // Token ids of `data`; raises ValueError where no token is a prefix of the rest of the input.
  py::list encode(const py::bytes& data) const {
    char* ptr = nullptr;
    Py_ssize_t size = 0;
    if (PyBytes_AsStringAndSize(data.ptr(), &ptr, &size) != 0) throw py::error_already_set();
    const auto* src = reinterpret_cast<const uint8_t*>(ptr);
    const size_t n = static_cast<size_t>(size);
    std::vector<int32_t> ids;
    size_t bad = n;
    {
      py::gil_scoped_release release;
      ids.reserve(n / 3 + 1);
      size_t i = 0;
      while (i < n) {
        int32_t node = 0, best_id = -1;
        size_t best_end = i;
        for (size_t j = i; j < n; ++j) {
          node = child(node, src[j]);
          if (node < 0) break;
          if (nodes_[node].token >= 0) {
            best_id = nodes_[node].token;
            best_end = j + 1;
          }
        }
        if (best_id < 0) {
          bad = i;
          break;
        }
        ids.push_back(best_id);
        i = best_end;
      }
    }
    if (bad < n)
      throw py::value_error("no token of the vocabulary is a prefix of the input at offset " +
                            std::to_string(bad) + " (byte 0x" + hex(src[bad]) + ")");
    PyObject* list = PyList_New(static_cast<Py_ssize_t>(ids.size()));
    if (list == nullptr) throw py::error_already_set();
    for (size_t k = 0; k < ids.size(); ++k) {
      PyObject* value = ints_[static_cast<size_t>(ids[k])].ptr();
      Py_INCREF(value);
      PyList_SET_ITEM(list, static_cast<Py_ssize_t>(k), value);
    }
    return py::reinterpret_steal<py::list>(list);
  }

  size_t num_nodes() const { return nodes_.size(); }

 private:
  struct Node {
    int32_t token = -1;       // id of the token ending here, or -1
    int32_t dense_slot = -1;  // the node's row of dense_ (256 children), or -1
    uint32_t edge_begin = 0;  // the children are edges [edge_begin, edge_begin + edge_count)
    uint32_t edge_count = 0;
  };
  std::vector<Node> nodes_;
  std::vector<py::int_> ints_;  // the Python int of every id, shared by all results (no allocation per token)
  std::vector<uint8_t> edge_byte_;
  std::vector<int32_t> edge_child_;
  std::vector<int32_t> dense_;

  static std::string hex(uint8_t b) {
    const char* digits = "0123456789abcdef";
    return std::string{digits[b >> 4], digits[b & 15]};
  }

  int32_t new_node() {
    nodes_.emplace_back();
    return static_cast<int32_t>(nodes_.size() - 1);
  }

  inline int32_t child(int32_t node, uint8_t b) const {
    const Node& n = nodes_[node];
    if (n.dense_slot >= 0) return dense_[static_cast<size_t>(n.dense_slot) * 256 + b];
    const uint32_t begin = n.edge_begin, end = begin + n.edge_count;
    for (uint32_t e = begin; e < end; ++e) {
      const uint8_t eb = edge_byte_[e];
      if (eb == b) return edge_child_[e];
      if (eb > b) break;  // edges are sorted by byte
    }
    return -1;
  }

  // `tokens[lo, hi)` all start with the node's `depth`-byte prefix (sorted, so the node's own token, if any,
  // comes first). Equal strings keep their file order and the last one wins, as in the reference's dict.
  void build(const std::vector<std::pair<std::string, int64_t>>& tokens, size_t lo, size_t hi, size_t depth,
             int32_t node) {
    while (lo < hi && tokens[lo].first.size() == depth) {
      nodes_[node].token = static_cast<int32_t>(tokens[lo].second);
      ++lo;
    }
    // group the rest by their byte at `depth`
    std::vector<std::pair<uint8_t, std::pair<size_t, size_t>>> groups;
    for (size_t i = lo; i < hi;) {
      const uint8_t b = static_cast<uint8_t>(tokens[i].first[depth]);
      size_t j = i + 1;
      while (j < hi && static_cast<uint8_t>(tokens[j].first[depth]) == b) ++j;
      groups.push_back({b, {i, j}});
      i = j;
    }
    if (groups.empty()) return;
    const uint32_t begin = static_cast<uint32_t>(edge_byte_.size());
    nodes_[node].edge_begin = begin;
    nodes_[node].edge_count = static_cast<uint32_t>(groups.size());
    for (const auto& g : groups) {
      edge_byte_.push_back(g.first);
      edge_child_.push_back(new_node());
    }
    if (static_cast<int>(groups.size()) >= kDenseMin) {
      const size_t row = dense_.size();
      nodes_[node].dense_slot = static_cast<int32_t>(row / 256);
      dense_.resize(row + 256, -1);
      for (size_t k = 0; k < groups.size(); ++k) dense_[row + groups[k].first] = edge_child_[begin + k];
    }
    for (size_t k = 0; k < groups.size(); ++k)
      build(tokens, groups[k].second.first, groups[k].second.second, depth + 1, edge_child_[begin + k]);
  }
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Greedy longest-match byte trie for the RWKV World tokenizer";
  py::class_<WorldTrie>(m, "WorldTrie")
      .def(py::init([](const std::vector<std::pair<py::bytes, int64_t>>& tokens) {
             std::vector<std::pair<std::string, int64_t>> owned;
             owned.reserve(tokens.size());
             for (const auto& t : tokens) owned.emplace_back(std::string(t.first), t.second);
             return WorldTrie(std::move(owned));
           }),
           py::arg("tokens"), "tokens: (byte string, id) pairs; the last id wins for repeated strings")
      .def("encode", &WorldTrie::encode, py::arg("data"), "token ids of a bytes object")
      .def("num_nodes", &WorldTrie::num_nodes);
}
