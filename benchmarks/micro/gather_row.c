/* The batch-1 condensed row kernel in plain C: how fast can y[o] = sum_k W[o,k] * x[idx[o,k]] run on this CPU?
 *
 *   gcc -O3 -march=znver3 -fopenmp benchmarks/micro/gather_row.c -o /tmp/gather_row && /tmp/gather_row
 *   OMP_NUM_THREADS=1 /tmp/gather_row       # one core: scales linearly with rows, so it is not memory-bound
 *
 * 768 rows x 312 non-zeros (the paper's 3072->768 layer at 90%), int16 indices read four to a 64-bit word.
 * Ways to build the 8-wide vector of gathered x: ins4 (scalar loads + vinsertps), bl4 (broadcasts + blends),
 * mx4 (half of each), bx4 (as ins4, each index taken out of its word by one BMI1 bextr and the load folded into
 * vinsertps), vg4 (AVX2 vgatherdps on zero-extended indices). Each prints the median and 10th percentile of
 * 3000 calls, in microseconds. This is the floor quoted in benchmarks/RESULTS.md ("Batch 1"): on 2 Zen 3 cores
 * ~32 us for ins4, ~28 us for bx4 (what the TVM row kernel does since it uses bextr), ~53 us for vg4.
 */
#include <immintrin.h>
#include <stdio.h>
#include <stdlib.h>
#include <stdint.h>
#include <string.h>
#include <time.h>
#include <omp.h>
#define NO 768
#define NI 3072
#define K 312
float W[NO*K] __attribute__((aligned(64))); int16_t IDX[NO*K] __attribute__((aligned(64)));
float X[NI] __attribute__((aligned(64))); float Y[NO];
static double now(){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec*1e6+t.tv_nsec*1e-3;}
static inline __m256 g8(const int16_t*ix){ uint64_t q0,q1; memcpy(&q0,ix,8); memcpy(&q1,ix+4,8);
  __m128 lo=_mm_load_ss(X+(uint16_t)q0); lo=_mm_insert_ps(lo,_mm_load_ss(X+(uint16_t)(q0>>16)),0x10);
  lo=_mm_insert_ps(lo,_mm_load_ss(X+(uint16_t)(q0>>32)),0x20); lo=_mm_insert_ps(lo,_mm_load_ss(X+(uint16_t)(q0>>48)),0x30);
  __m128 hi=_mm_load_ss(X+(uint16_t)q1); hi=_mm_insert_ps(hi,_mm_load_ss(X+(uint16_t)(q1>>16)),0x10);
  hi=_mm_insert_ps(hi,_mm_load_ss(X+(uint16_t)(q1>>32)),0x20); hi=_mm_insert_ps(hi,_mm_load_ss(X+(uint16_t)(q1>>48)),0x30);
  return _mm256_insertf128_ps(_mm256_castps128_ps256(lo),hi,1);}
static inline __m256 b8(const int16_t*ix){ uint64_t q0,q1; memcpy(&q0,ix,8); memcpy(&q1,ix+4,8);
  __m256 v0=_mm256_broadcast_ss(X+(uint16_t)q0), v1=_mm256_broadcast_ss(X+(uint16_t)(q0>>16)),v2=_mm256_broadcast_ss(X+(uint16_t)(q0>>32)),v3=_mm256_broadcast_ss(X+(uint16_t)(q0>>48));
  __m256 v4=_mm256_broadcast_ss(X+(uint16_t)q1), v5=_mm256_broadcast_ss(X+(uint16_t)(q1>>16)),v6=_mm256_broadcast_ss(X+(uint16_t)(q1>>32)),v7=_mm256_broadcast_ss(X+(uint16_t)(q1>>48));
  __m256 a=_mm256_blend_ps(v0,v1,0x02), b=_mm256_blend_ps(v2,v3,0x08), c=_mm256_blend_ps(v4,v5,0x20), d=_mm256_blend_ps(v6,v7,0x80);
  a=_mm256_blend_ps(a,b,0x0c); c=_mm256_blend_ps(c,d,0xc0); return _mm256_blend_ps(a,c,0xf0);}
static inline __m256 m8(const int16_t*ix){ uint64_t q0,q1; memcpy(&q0,ix,8); memcpy(&q1,ix+4,8);
  __m128 lo=_mm_load_ss(X+(uint16_t)q0); lo=_mm_insert_ps(lo,_mm_load_ss(X+(uint16_t)(q0>>16)),0x10);
  lo=_mm_insert_ps(lo,_mm_load_ss(X+(uint16_t)(q0>>32)),0x20); lo=_mm_insert_ps(lo,_mm_load_ss(X+(uint16_t)(q0>>48)),0x30);
  __m256 v4=_mm256_broadcast_ss(X+(uint16_t)q1), v5=_mm256_broadcast_ss(X+(uint16_t)(q1>>16)),v6=_mm256_broadcast_ss(X+(uint16_t)(q1>>32)),v7=_mm256_broadcast_ss(X+(uint16_t)(q1>>48));
  __m256 c=_mm256_blend_ps(v4,v5,0x20), d=_mm256_blend_ps(v6,v7,0x80); c=_mm256_blend_ps(c,d,0xc0);
  return _mm256_blend_ps(_mm256_castps128_ps256(lo),c,0xf0);}
#define INS(v, p, imm) __asm__("vinsertps %2, %1, %0, %0" : "+x"(v) : "m"(*(p)), "i"(imm))
static inline __m256 e8(const int16_t*ix){ uint64_t q0,q1; memcpy(&q0,ix,8); memcpy(&q1,ix+4,8);
  __m128 lo=_mm_load_ss(X+(q0&0xffff)); INS(lo, X+_bextr_u64(q0,16,16), 0x10); INS(lo, X+_bextr_u64(q0,32,16), 0x20); INS(lo, X+(q0>>48), 0x30);
  __m128 hi=_mm_load_ss(X+(q1&0xffff)); INS(hi, X+_bextr_u64(q1,16,16), 0x10); INS(hi, X+_bextr_u64(q1,32,16), 0x20); INS(hi, X+(q1>>48), 0x30);
  return _mm256_insertf128_ps(_mm256_castps128_ps256(lo),hi,1);}
static inline __m256 v8(const int16_t*ix){
  return _mm256_i32gather_ps(X, _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)ix)), 4);}
#define KER(name,G) void name(){ \
 _Pragma("omp parallel for schedule(static)") \
 for(int o=0;o<NO;o++){ const float*w=W+o*K; const int16_t*ix=IDX+o*K; __m256 a=_mm256_setzero_ps(),b=_mm256_setzero_ps(),c=_mm256_setzero_ps(),d=_mm256_setzero_ps(); \
  int k=0; for(;k+32<=K;k+=32){ a=_mm256_fmadd_ps(_mm256_loadu_ps(w+k),G(ix+k),a); b=_mm256_fmadd_ps(_mm256_loadu_ps(w+k+8),G(ix+k+8),b); \
     c=_mm256_fmadd_ps(_mm256_loadu_ps(w+k+16),G(ix+k+16),c); d=_mm256_fmadd_ps(_mm256_loadu_ps(w+k+24),G(ix+k+24),d);} \
  for(;k<K;k+=8){ a=_mm256_fmadd_ps(_mm256_loadu_ps(w+k),G(ix+k),a);} \
  a=_mm256_add_ps(_mm256_add_ps(a,b),_mm256_add_ps(c,d)); __m128 s=_mm_add_ps(_mm256_castps256_ps128(a),_mm256_extractf128_ps(a,1)); s=_mm_hadd_ps(s,s);s=_mm_hadd_ps(s,s); Y[o]=_mm_cvtss_f32(s);}}
KER(ins4,g8) KER(bl4,b8) KER(mx4,m8) KER(bx4,e8) KER(vg4,v8)
int cmp(const void*a,const void*b){double x=*(double*)a,y=*(double*)b;return x<y?-1:x>y;}
void bench(const char*n,void(*f)()){ double t[3000]; for(int i=0;i<200;i++)f(); for(int i=0;i<3000;i++){double s=now();f();t[i]=now()-s;} qsort(t,3000,8,cmp); printf("%-8s median %.1f us  p10 %.1f  Y0=%f\n",n,t[1500],t[300],Y[0]);}
int main(){ srand(1); for(int i=0;i<NI;i++)X[i]=rand()/(float)RAND_MAX; for(int o=0;o<NO;o++){for(int k=0;k<K;k++){IDX[o*K+k]=(k*NI/K)+rand()%(NI/K); W[o*K+k]=rand()/(float)RAND_MAX;}}
 for(int r=0;r<2;r++){ bench("ins4",ins4); bench("bl4",bl4); bench("mx4",mx4); bench("bx4",bx4); bench("vg4",vg4);}}
