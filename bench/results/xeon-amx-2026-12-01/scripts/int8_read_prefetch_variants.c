#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
static double now(void){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+1e-9*t.tv_nsec;}
static uint64_t rng=88172645463325252ull; static uint64_t nx(void){rng^=rng<<13;rng^=rng>>7;rng^=rng<<17;return rng;}
static int cmpd(const void*a,const void*b){double x=*(double*)a,y=*(double*)b;return x<y?-1:x>y;}
#define PF3(r,h) do{_mm_prefetch((r),h);_mm_prefetch((r)+64,h);_mm_prefetch((r)+135,h);}while(0)
static double run(const uint8_t* t, const int64_t* idx, int64_t nb, float* out, int mode){
  double t0=now(); const int64_t n=32*nb;
#pragma omp parallel for schedule(static)
  for(int64_t b=0;b<nb;++b){
    __m512i a0=_mm512_setzero_si512(),a1=a0; uint64_t a2=0;
    for(int64_t p=32*b;p<32*b+32;++p){
      switch(mode){
        case 0: PF3((const char*)(t+idx[p+16<n?p+16:p]*136),_MM_HINT_T0); break;
        case 1: PF3((const char*)(t+idx[p+32<n?p+32:p]*136),_MM_HINT_T1); PF3((const char*)(t+idx[p+8<n?p+8:p]*136),_MM_HINT_T0); break;
        case 2: PF3((const char*)(t+idx[p+24<n?p+24:p]*136),_MM_HINT_T1); PF3((const char*)(t+idx[p+6<n?p+6:p]*136),_MM_HINT_T0); break;
        case 3: PF3((const char*)(t+idx[p+24<n?p+24:p]*136),_MM_HINT_T0); break;
        case 4: PF3((const char*)(t+idx[p+32<n?p+32:p]*136),_MM_HINT_T1); break;
      }
      const uint8_t* row=t+idx[p]*136;
      a0=_mm512_add_epi32(a0,_mm512_loadu_si512(row)); a1=_mm512_add_epi32(a1,_mm512_loadu_si512(row+64));
      uint64_t x; memcpy(&x,row+128,8); a2+=x;
    }
    out[b]=(float)_mm512_reduce_add_epi32(_mm512_add_epi32(a0,a1))+(float)a2;
  }
  return (now()-t0)*1e3;
}
int main(){
  const int64_t rows=1000000,nb=4096; uint8_t* t=aligned_alloc(64,rows*136);
  for(int64_t i=0;i<rows*136;++i)t[i]=i*7;
  int64_t* idx=malloc(32*nb*8); for(int64_t i=0;i<32*nb;++i)idx[i]=nx()%rows;
  float* out=malloc(nb*4);
  const char* names[]={"T0@16","T1@32+T0@8","T1@24+T0@6","T0@24","T1@32"};
  double r[5][41];
  for(int i=0;i<41;++i) for(int m=0;m<5;++m) r[m][i]=run(t,idx,nb,out,m);
  for(int m=0;m<5;++m){qsort(r[m],41,8,cmpd);printf("%-12s median %.3f ms  q1 %.3f  q3 %.3f\n",names[m],r[m][20],r[m][10],r[m][30]);}
  return out[0]==1.2345f;
}
