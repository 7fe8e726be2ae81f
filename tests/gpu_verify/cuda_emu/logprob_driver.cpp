// Runs csrc/cuda/logprob_kernels.cu on the CPU (through cuda_emu.h) on one case written by tests/test_cuda_emu.py,
// and writes the raw results back for the test to compare with the float64 reference. No checking here: the plain
// PyTorch reference stays the single oracle.
//
//   logprob_driver DIR dtype=bf16 ndim=2 sizes=3,5 strides=5005,1001 base=1 elems=N vocab=V sm_count=132
//                  temperature=0.7 softcap=0 ignore_index=-100
// Reads DIR/logits.bin (elems raw elements; the rows start at element `base`), DIR/labels.bin (int64 per row),
// DIR/coef.bin (float32 per row: dL/dlogp). Writes DIR/lse.bin (float64), DIR/logp.bin (float32), DIR/grad.bin
// (out-of-place dlogits, rows x vocab contiguous) and DIR/inplace.bin (the whole buffer after the in-place backward),
// and prints the shape and splits the launcher chose. With entropy=1 it also reads DIR/coef_h.bin (float32 per row:
// dL/dH), runs the entropy variants and writes DIR/entropy.bin (float32). Every buffer is allocated at its exact
// size, so that AddressSanitizer reports any access past it.
#include "logprob_kernels.emu.cpp"  // the project's kernels with <<<>>> rewritten (build.py)

#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

using namespace rlhfv::cuda;

namespace {

[[noreturn]] void die(const std::string& what) {
  std::fprintf(stderr, "logprob_driver: %s\n", what.c_str());
  std::exit(2);
}

std::vector<int64_t> ints(const std::string& csv) {
  std::vector<int64_t> out;
  std::stringstream ss(csv);
  for (std::string item; std::getline(ss, item, ',');) out.push_back(std::stoll(item));
  return out;
}

template <typename T>
std::unique_ptr<T[]> read_file(const std::string& path, int64_t count) {
  std::unique_ptr<T[]> data(new T[count > 0 ? count : 1]);
  FILE* f = std::fopen(path.c_str(), "rb");
  if (!f || std::fread(data.get(), sizeof(T), count, f) != static_cast<size_t>(count)) die("cannot read " + path);
  std::fclose(f);
  return data;
}

template <typename T>
void write_file(const std::string& path, const T* data, int64_t count) {
  FILE* f = std::fopen(path.c_str(), "wb");
  if (!f || std::fwrite(data, sizeof(T), count, f) != static_cast<size_t>(count)) die("cannot write " + path);
  std::fclose(f);
}

template <typename T>
int run(const std::string& dir, std::map<std::string, std::string>& kv, DType dtype) {
  RowLayout layout;
  const std::vector<int64_t> sizes = ints(kv.at("sizes")), strides = ints(kv.at("strides"));
  if (sizes.size() != strides.size() || sizes.empty() || sizes.size() > kMaxLeadingDims) die("bad sizes/strides");
  layout.ndim = static_cast<int>(sizes.size());
  int64_t rows = 1;
  for (int d = 0; d < layout.ndim; ++d) {
    layout.sizes[d] = sizes[d];
    layout.strides[d] = strides[d];
    rows *= sizes[d];
  }
  const int64_t base = std::stoll(kv.at("base")), elems = std::stoll(kv.at("elems"));
  const int64_t vocab = std::stoll(kv.at("vocab"));
  const float temperature = std::stof(kv.at("temperature"));
  const float softcap = kv.count("softcap") ? std::stof(kv.at("softcap")) : 0.0f;
  const int64_t ignore_index = std::stoll(kv.at("ignore_index"));

  std::unique_ptr<T[]> buffer = read_file<T>(dir + "/logits.bin", elems);
  std::unique_ptr<int64_t[]> labels = read_file<int64_t>(dir + "/labels.bin", rows);
  std::unique_ptr<float[]> coef = read_file<float>(dir + "/coef.bin", rows);
  const bool with_entropy = kv.count("entropy") && kv.at("entropy") == "1";
  std::unique_ptr<float[]> coef_h = with_entropy ? read_file<float>(dir + "/coef_h.bin", rows) : nullptr;
  T* logits = buffer.get() + base;

  int64_t split_size = 0;
  const Shape shape = choose_shape(rows, vocab);
  const int splits = choose_splits(rows, vocab, std::stoi(kv.at("sm_count")), &split_size);
  std::unique_ptr<float[]> part_max(new float[rows * splits]), part_sum(new float[rows * splits]);
  std::unique_ptr<float[]> target(new float[rows]), logp(new float[rows]);
  std::unique_ptr<double[]> lse(new double[rows]);
  ForwardArgs fa{logits, layout, labels.get(), rows, vocab, dtype, ignore_index, temperature, softcap, splits,
                 split_size, part_max.get(), part_sum.get(), target.get(), lse.get(), logp.get()};
  std::unique_ptr<float[]> part_moment(with_entropy ? new float[rows * splits] : nullptr);
  std::unique_ptr<float[]> entropy(with_entropy ? new float[rows] : nullptr);
  fa.part_moment = part_moment.get();
  fa.entropy = entropy.get();
  if (logprob_forward(fa, shape, nullptr) != cudaSuccess) die("forward launch failed");
  write_file(dir + "/lse.bin", lse.get(), rows);
  write_file(dir + "/logp.bin", logp.get(), rows);
  if (with_entropy) write_file(dir + "/entropy.bin", entropy.get(), rows);

  // Out of place into a contiguous buffer (its rows' alignment differs from strided or offset logits), then in place.
  std::unique_ptr<T[]> grad(new T[rows * vocab]);
  RowLayout out_layout = layout;
  int64_t stride = vocab;
  for (int d = layout.ndim - 1; d >= 0; --d) {
    out_layout.strides[d] = stride;
    stride *= layout.sizes[d];
  }
  BackwardArgs ba{logits, layout, grad.get(), out_layout, labels.get(), coef.get(), lse.get(), rows, vocab, dtype,
                  ignore_index, temperature, softcap, splits, split_size};
  ba.grad_entropy = coef_h.get();
  ba.entropy = entropy.get();
  if (logprob_backward(ba, shape, nullptr) != cudaSuccess) die("backward launch failed");
  write_file(dir + "/grad.bin", grad.get(), rows * vocab);
  ba.out = logits;
  ba.out_layout = layout;
  if (logprob_backward(ba, shape, nullptr) != cudaSuccess) die("in-place backward launch failed");
  write_file(dir + "/inplace.bin", buffer.get(), elems);

  std::printf("shape=%s splits=%d split_size=%lld\n", shape == Shape::kWarpPerRow ? "warp" : "block", splits,
              static_cast<long long>(split_size));
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) die("usage: logprob_driver DIR key=value...");
  std::map<std::string, std::string> kv;
  for (int i = 2; i < argc; ++i) {
    const std::string arg = argv[i];
    const size_t eq = arg.find('=');
    if (eq == std::string::npos) die("expected key=value, got " + arg);
    kv[arg.substr(0, eq)] = arg.substr(eq + 1);
  }
  const std::string dtype = kv.at("dtype");
  if (dtype == "fp32") return run<float>(argv[1], kv, DType::kFloat32);
  if (dtype == "bf16") return run<__nv_bfloat16>(argv[1], kv, DType::kBFloat16);
  if (dtype == "fp16") return run<__half>(argv[1], kv, DType::kFloat16);
  die("unknown dtype " + dtype);
}
