// Flash attention over tiles whose queries and keys are runs of rows: the CPU kernel of the
// native backend (kernels/native.py builds it on first use).
//
// A tile is a set of query rows and the key rows they may see, each given as runs of
// consecutive rows (start, length): a band tile is one query run and one key run, an 8 x 8
// image tile is 8 query runs and one key run per grid row it reaches. Every tile is one online
// softmax over all its keys, read in blocks of up to kBlock keys: a long run in place, short
// runs packed together first. An optional 0/1 mask covers the tile's first `cols` keys; the
// keys after them (text keys, pooled keys) are seen by every query of the tile.
//
// One call handles one head: rows of q / out [N, D] and of k / v [M, D], float32, contiguous.
// It runs without the GIL, so several heads run at once on Python threads.

#include <torch/extension.h>

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <vector>

// BLAS single-precision matrix product (column-major), exported by torch's CPU library.
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc);

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kBlock = 512;    // keys per block of scores
constexpr int64_t kLongRun = 128;  // runs at least this long are read in place, shorter ones packed
constexpr float kMinusInf = -std::numeric_limits<float>::infinity();

void gemm(char transa, char transb, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
          const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  const int im = m, in = n, ik = k, ilda = lda, ildb = ldb, ildc = ldc;
  sgemm_(&transa, &transb, &im, &in, &ik, &alpha, a, &ilda, b, &ildb, &beta, c, &ildc);
}

struct Run {
  int64_t start, length;
};

// Scratch left uninitialised: pages never written (packing buffers of a call whose runs are
// all long) never become resident.
using Buffer = std::unique_ptr<float[]>;

// The running softmax of one tile's queries: row maxima, row sums and the unnormalised output;
// and the block of scores being folded in.
struct Softmax {
  std::vector<float> max, sum;
  Buffer acc, scores;
};

// The tiles of a call: tile t's query runs are queries[query_offsets[t] .. query_offsets[t+1]),
// its key runs likewise; its mask (or -1) indexes mask_starts / mask_cols into masks.
struct Tiles {
  const int64_t *query_offsets, *key_offsets, *mask_of_tile, *mask_starts, *mask_cols;
  const Run *queries, *keys;
  const uint8_t* masks;
};

// Fold one block of keys into the running softmax: scores, mask, rescale, accumulate.
void attend_block(const float* q, int64_t rows, const float* k, const float* v, int64_t keys, int64_t dim,
                  float scale, const uint8_t* mask, int64_t mask_cols, int64_t first_key, Softmax& s) {
  float* scores = s.scores.get();
  // scores [rows x keys] (row-major) = scale * q k^T, computed as its column-major transpose
  gemm('T', 'N', keys, rows, dim, scale, k, dim, q, dim, 0.f, scores, keys);
  const int64_t masked = mask ? std::clamp<int64_t>(mask_cols - first_key, 0, keys) : 0;
  for (int64_t r = 0; r < rows; ++r) {
    float* row = scores + r * keys;
    for (int64_t c = 0; c < masked; ++c) {
      if (!mask[r * mask_cols + first_key + c]) row[c] = kMinusInf;
    }
    const float block_max = at::vec::reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, row, keys);
    const float new_max = std::max(s.max[r], block_max);
    if (new_max == kMinusInf) {  // no key of this row seen yet
      std::fill(row, row + keys, 0.f);
      continue;
    }
    at::vec::map([new_max](Vec x) { return (x - Vec(new_max)).exp_u20(); }, row, row, keys);
    const float correction = std::exp(s.max[r] - new_max);
    s.sum[r] = s.sum[r] * correction +
               at::vec::reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, row, keys);
    s.max[r] = new_max;
    if (correction != 1.f) {
      float* acc = s.acc.get() + r * dim;
      at::vec::map([correction](Vec x) { return x * Vec(correction); }, acc, acc, dim);
    }
  }
  // acc [rows x dim] += p v, as its column-major transpose
  gemm('N', 'N', dim, rows, keys, 1.f, v, dim, scores, keys, 1.f, s.acc.get(), dim);
}

void attend_tile(int64_t t, const Tiles& tiles, const float* q, const float* k, const float* v, float* out,
                 float* lse, int64_t dim, float scale, bool resume, float* packed_q, float* packed_k,
                 float* packed_v, Softmax& s) {
  const Run* query_runs = tiles.queries + tiles.query_offsets[t];
  const int64_t query_run_count = tiles.query_offsets[t + 1] - tiles.query_offsets[t];
  int64_t rows = 0;
  for (int64_t i = 0; i < query_run_count; ++i) rows += query_runs[i].length;
  const bool one_run = query_run_count == 1;
  const size_t row_bytes = dim * sizeof(float);

  // queries, and the softmax state: fresh, or resumed from a previous call's output and lse
  const float* queries = q + query_runs[0].start * dim;
  std::fill(s.acc.get(), s.acc.get() + rows * dim, 0.f);
  std::fill(s.max.begin(), s.max.begin() + rows, kMinusInf);
  std::fill(s.sum.begin(), s.sum.begin() + rows, 0.f);
  for (int64_t i = 0, r = 0; i < query_run_count; ++i) {
    const Run run = query_runs[i];
    if (!one_run) std::memcpy(packed_q + r * dim, q + run.start * dim, run.length * row_bytes);
    if (resume) {
      std::memcpy(s.acc.get() + r * dim, out + run.start * dim, run.length * row_bytes);
      std::copy(lse + run.start, lse + run.start + run.length, s.max.begin() + r);
      std::fill(s.sum.begin() + r, s.sum.begin() + r + run.length, 1.f);
    }
    r += run.length;
  }
  if (!one_run) queries = packed_q;

  const int64_t mask_id = tiles.mask_of_tile[t];
  const uint8_t* mask = mask_id < 0 ? nullptr : tiles.masks + tiles.mask_starts[mask_id];
  const int64_t mask_cols = mask_id < 0 ? 0 : tiles.mask_cols[mask_id];

  // keys, block by block: a long run in place, consecutive short runs packed
  const Run* key_runs = tiles.keys + tiles.key_offsets[t];
  const int64_t key_run_count = tiles.key_offsets[t + 1] - tiles.key_offsets[t];
  int64_t run = 0, offset = 0, first_key = 0;
  while (run < key_run_count) {
    const float *block_k, *block_v;
    int64_t keys = 0;
    if (key_runs[run].length >= kLongRun) {
      keys = std::min(kBlock, key_runs[run].length - offset);
      block_k = k + (key_runs[run].start + offset) * dim;
      block_v = v + (key_runs[run].start + offset) * dim;
      offset += keys;
    } else {
      while (run < key_run_count && key_runs[run].length < kLongRun && keys < kBlock) {
        const int64_t take = std::min(kBlock - keys, key_runs[run].length - offset);
        const int64_t from = key_runs[run].start + offset;
        std::memcpy(packed_k + keys * dim, k + from * dim, take * row_bytes);
        std::memcpy(packed_v + keys * dim, v + from * dim, take * row_bytes);
        keys += take;
        offset += take;
        if (offset == key_runs[run].length) ++run, offset = 0;
      }
      block_k = packed_k;
      block_v = packed_v;
    }
    if (run < key_run_count && offset == key_runs[run].length) ++run, offset = 0;
    attend_block(queries, rows, block_k, block_v, keys, dim, scale, mask, mask_cols, first_key, s);
    first_key += keys;
  }

  // normalise into the output rows, and keep each row's log-sum-exp
  for (int64_t i = 0, r = 0; i < query_run_count; ++i) {
    const Run run = query_runs[i];
    for (int64_t j = 0; j < run.length; ++j, ++r) {
      const float inverse = 1.f / s.sum[r];
      float* row = out + (run.start + j) * dim;
      const float* acc = s.acc.get() + r * dim;
      at::vec::map([inverse](Vec x) { return x * Vec(inverse); }, row, acc, dim);
      lse[run.start + j] = s.max[r] + std::log(s.sum[r]);
    }
  }
}

void check(const torch::Tensor& x, const char* name, at::ScalarType dtype, int64_t dims) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == dtype && x.dim() == dims && x.is_contiguous(), name,
              " must be a contiguous CPU tensor of ", dims, " dims and dtype ", dtype, ", got ", x.scalar_type(),
              " of shape ", x.sizes());
}

}  // namespace

// Attend every tile; with `resume`, continue each query row's softmax from `out` and `lse`
// (a previous call's result) instead of starting afresh: keys can come in several calls.
void attend_tiles(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, const torch::Tensor& out,
                  const torch::Tensor& lse, const torch::Tensor& query_offsets, const torch::Tensor& query_runs,
                  const torch::Tensor& key_offsets, const torch::Tensor& key_runs, const torch::Tensor& mask_of_tile,
                  const torch::Tensor& mask_starts, const torch::Tensor& mask_cols, const torch::Tensor& masks,
                  int64_t max_rows, double scale, bool resume) {
  for (auto [x, name] : {std::pair{&q, "q"}, {&k, "k"}, {&v, "v"}, {&out, "out"}}) check(*x, name, at::kFloat, 2);
  check(lse, "lse", at::kFloat, 1);
  for (auto [x, name] : {std::pair{&query_offsets, "query_offsets"}, {&key_offsets, "key_offsets"},
                         {&mask_of_tile, "mask_of_tile"}, {&mask_starts, "mask_starts"}, {&mask_cols, "mask_cols"}})
    check(*x, name, at::kLong, 1);
  check(query_runs, "query_runs", at::kLong, 2);
  check(key_runs, "key_runs", at::kLong, 2);
  check(masks, "masks", at::kByte, 1);
  const int64_t dim = q.size(1);
  TORCH_CHECK(k.size(1) == dim && v.sizes() == k.sizes() && out.sizes() == q.sizes() && lse.size(0) == q.size(0),
              "q/out [N, D], k/v [M, D] and lse [N] must agree");
  const Tiles tiles{query_offsets.data_ptr<int64_t>(), key_offsets.data_ptr<int64_t>(),
                    mask_of_tile.data_ptr<int64_t>(),  mask_starts.data_ptr<int64_t>(),
                    mask_cols.data_ptr<int64_t>(),     reinterpret_cast<const Run*>(query_runs.data_ptr<int64_t>()),
                    reinterpret_cast<const Run*>(key_runs.data_ptr<int64_t>()), masks.data_ptr<uint8_t>()};
  Buffer packed_q(new float[max_rows * dim]), packed_k(new float[kBlock * dim]), packed_v(new float[kBlock * dim]);
  Softmax s{std::vector<float>(max_rows), std::vector<float>(max_rows), Buffer(new float[max_rows * dim]),
            Buffer(new float[max_rows * kBlock])};
  for (int64_t t = 0; t + 1 < query_offsets.size(0); ++t) {
    attend_tile(t, tiles, q.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(), out.data_ptr<float>(),
                lse.data_ptr<float>(), dim, static_cast<float>(scale), resume, packed_q.get(), packed_k.get(),
                packed_v.get(), s);
  }
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("attend_tiles", &attend_tiles, "Flash attention over tiles of query and key runs (one head)",
        py::call_guard<py::gil_scoped_release>());
}
