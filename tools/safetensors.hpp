// tools/safetensors.hpp — a small reader of .safetensors files (the format
// Hugging Face checkpoints ship in), for the examples and tests.
//
// Layout: 8 bytes little-endian header length N, N bytes of JSON
//   {"name": {"dtype": "F32", "shape": [r, c], "data_offsets": [begin, end]}, ...,
//    "__metadata__": {...}}
// then the data; offsets count from the end of the header. Tensors are
// row-major. This reader keeps the file in memory and hands out F32
// tensors (copied, so alignment never matters); F16/BF16/I64 entries are
// listed but not converted. The JSON is parsed with nlohmann-json.
#pragma once

#include <nlohmann/json.hpp>

#include <cstdint>
#include <cstring>
#include <fstream>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

namespace attn_tools {

/// One tensor: shape and its values (row-major).
struct Tensor {
  std::vector<std::int64_t> shape;
  std::vector<float> data;
  std::int64_t dim(std::size_t i) const { return shape.at(i); }
};

class SafeTensors {
 public:
  /// Reads `path`; throws std::runtime_error on a missing file or a malformed header.
  explicit SafeTensors(const std::string& path) {
    std::ifstream f(path, std::ios::binary);
    if (!f) throw std::runtime_error("safetensors: cannot open " + path);
    unsigned char len_bytes[8];
    if (!f.read(reinterpret_cast<char*>(len_bytes), 8))
      throw std::runtime_error("safetensors: " + path + " is shorter than 8 bytes");
    std::uint64_t n = 0;
    for (int i = 7; i >= 0; --i) n = (n << 8) | len_bytes[i];
    f.seekg(0, std::ios::end);
    const auto file_size = static_cast<std::uint64_t>(f.tellg());
    if (n > file_size - 8) throw std::runtime_error("safetensors: header length past end of file");
    std::string header(static_cast<std::size_t>(n), '\0');
    f.seekg(8);
    f.read(header.data(), static_cast<std::streamsize>(n));
    bytes_.resize(static_cast<std::size_t>(file_size - 8 - n));
    f.read(bytes_.data(), static_cast<std::streamsize>(bytes_.size()));
    if (!f) throw std::runtime_error("safetensors: short read of " + path);
    const nlohmann::json j = nlohmann::json::parse(header);
    for (auto it = j.begin(); it != j.end(); ++it) {
      if (it.key() == "__metadata__") continue;
      Entry e;
      e.dtype = it.value().at("dtype").get<std::string>();
      e.shape = it.value().at("shape").get<std::vector<std::int64_t>>();
      const auto off = it.value().at("data_offsets").get<std::vector<std::uint64_t>>();
      if (off.size() != 2 || off[0] > off[1] || off[1] > bytes_.size())
        throw std::runtime_error("safetensors: bad data_offsets of " + it.key());
      e.begin = off[0];
      e.end = off[1];
      entries_[it.key()] = e;
    }
  }

  bool contains(const std::string& name) const { return entries_.count(name) != 0; }

  /// The F32 tensor `name`; throws if absent, of another dtype, or of a
  /// byte length that does not match its shape.
  Tensor get(const std::string& name) const {
    const auto it = entries_.find(name);
    if (it == entries_.end()) throw std::runtime_error("safetensors: no tensor " + name);
    const Entry& e = it->second;
    if (e.dtype != "F32")
      throw std::runtime_error("safetensors: " + name + " is " + e.dtype + ", only F32 is read");
    std::uint64_t count = 1;
    for (std::int64_t d : e.shape) count *= static_cast<std::uint64_t>(d);
    if (count * sizeof(float) != e.end - e.begin)
      throw std::runtime_error("safetensors: " + name + " has a byte length unlike its shape");
    Tensor t;
    t.shape = e.shape;
    t.data.resize(static_cast<std::size_t>(count));
    std::memcpy(t.data.data(), bytes_.data() + e.begin, static_cast<std::size_t>(e.end - e.begin));
    return t;
  }

 private:
  struct Entry {
    std::string dtype;
    std::vector<std::int64_t> shape;
    std::uint64_t begin = 0, end = 0;
  };
  std::vector<char> bytes_;
  std::map<std::string, Entry> entries_;
};

}  // namespace attn_tools
